"""Helpers the test wings share: builders of files and experiments, launched-run helpers.
Test files import from here, never from one another."""
