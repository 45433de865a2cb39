"""The kernel wing: the kernel: config, plugins and their contracts, the CLI, the training loop and run directory, packaging, the plugin-author kit, optimizers and schedules, loggers and trackers, plan, evaluate, signals and time limits.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""
