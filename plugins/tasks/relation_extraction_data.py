"""Relation extraction as BioMegatron fine-tunes it: sentence classification of a sentence
whose two entities are replaced by markers.

Two formats are read:

* The text classification TSV (`text<TAB>id`), with an optional `label_mapping.tsv`
  (`label<TAB>id` per line) naming the ids: what NeMo's `import_datasets.py` writes and
  what fine-tuning reads. The markers are ordinary words of the text, e.g.
  `<@CHEMICAL$> inhibits <@GENE$> activity .`
* The ChemProt source rows (`id<TAB>text<TAB>True|False<TAB>CPR:k`): the label is the 4th
  column when the 3rd is `True`, else the literal `False`. `convert_chemprot` turns them into
  the TSV above, numbering labels in order of first appearance (train, then test, then dev,
  as NeMo's converter does).

Precision, recall and F1 are NeMo's ClassificationReport (micro by default);
`negative_label` (e.g. `False`) names a class to leave out of the micro average, the
BLUE-style convention of scoring only true relations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mega.errors import DataError
from mega.plugins.tasks.metrics.classification_report import METRIC_EPS
from mega.checkpoint.atomic import atomic_write_text


def read_chemprot_rows(path, do_lower_case: bool = False) -> List[Tuple[str, str]]:
    """(text, label) of a ChemProt source file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ChemProt file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            raise DataError(f"{path}:{n}: expected `id<TAB>text<TAB>True|False<TAB>CPR:k`, got {len(cols)} columns")
        text = cols[1].lower() if do_lower_case else cols[1]
        if cols[2].strip() == "True":
            if len(cols) < 4 or not cols[3].strip():
                raise DataError(f"{path}:{n}: a True row needs its relation (CPR:k) in the 4th column")
            label = cols[3].strip()
        else:
            label = "False"
        out.append((" ".join(text.split()), label))
    return out


def convert_chemprot(source_dir, out_dir, do_lower_case: bool = False,
                     names=(("train", "trainingPosit_chem"), ("test", "testPosit_chem"), ("dev", "developPosit_chem"))) -> Dict[str, int]:
    """Write `{split}.tsv` and `label_mapping.tsv` from ChemProt source files; return the map."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping: Dict[str, int] = {}
    rows = {}
    for split, name in names:
        path = source_dir / name
        if not path.exists():
            continue
        rows[split] = read_chemprot_rows(path, do_lower_case)
        for _, label in rows[split]:
            mapping.setdefault(label, len(mapping))
    if not rows:
        raise DataError(f"{source_dir}: none of {', '.join(n for _, n in names)} found")
    for split, pairs in rows.items():
        _write(out_dir / f"{split}.tsv", "".join(f"{t}\t{mapping[l]}\n" for t, l in pairs))
    _write(out_dir / "label_mapping.tsv", "".join(f"{l}\t{i}\n" for l, i in mapping.items()))
    return mapping


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def read_label_mapping(path) -> Dict[int, str]:
    """id -> label name of a `label<TAB>id` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label mapping file not found")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit("\t", 1)
        try:
            out[int(parts[1])] = parts[0]
        except (IndexError, ValueError):
            raise DataError(f"{path}:{n}: expected `label<TAB>id`") from None
    return out


def micro_without(report, negative_id: Optional[int]):
    """Micro (precision, recall, f1) in percent over every class but `negative_id`."""
    keep = [i for i in range(report.num_classes) if i != negative_id]
    tp = sum(report.tp[i] for i in keep)
    fp = sum(report.fp[i] for i in keep)
    fn = sum(report.fn[i] for i in keep)
    p = 100.0 * tp / (tp + fp + METRIC_EPS)
    r = 100.0 * tp / (tp + fn + METRIC_EPS)
    return p, r, 2 * p * r / (p + r + METRIC_EPS)
