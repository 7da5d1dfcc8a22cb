"""Many embeddings in one run: the ``--concepts FILE`` list and the ``--sweep`` grid, checked before any model loads.

A concepts file names, per embedding, what a single run takes from its flags::

    # YAML (a list, or a mapping with a ``concepts:`` list, or a mapping name -> fields)
    - name: red-ball
      train_data_dir: data/red-ball
      init_text: ball              # initializer_token; default --initializer_token
      num_vectors: 2               # default --num_vectors
      template: subject            # template_file; default --template_file
      learning_rate: 0.01          # default --learning_rate (a number or an A1111 schedule)
      eval_data_dir: data/red-ball-held-out   # optional: its evaluation's held-out pictures (else its own)

JSON holds the same list or mapping; CSV has one row per embedding under a header of the same field names. A field
left out takes the run's flag. ``--sweep "learning_rate=2e-3,5e-3 num_vectors=1,2"`` turns every concept into one
variant per combination, each its own embedding, named ``<name>-lr2e-3-v1`` and so on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

# field -> the names a file may use for it (the first is the flag's name, the rest A1111's or short forms)
FIELDS = {
    "name": ("name", "placeholder_token", "embedding_name"),
    "train_data_dir": ("train_data_dir", "data", "data_dir"),
    "dataset_name": ("dataset_name", "dataset"),
    "initializer_token": ("initializer_token", "init_text"),
    "num_vectors": ("num_vectors", "vectors"),
    "template_file": ("template_file", "template"),
    "learning_rate": ("learning_rate", "lr"),
    "eval_data_dir": ("eval_data_dir", "eval_data"),
}
_ALIAS = {alias: field for field, names in FIELDS.items() for alias in names}

# --sweep keys -> (field, the short tag that goes into a variant's name)
SWEEP_KEYS = {"learning_rate": ("learning_rate", "lr"), "lr": ("learning_rate", "lr"),
              "num_vectors": ("num_vectors", "v"), "vectors": ("num_vectors", "v"),
              "initializer_token": ("initializer_token", "init"), "init_text": ("initializer_token", "init"),
              "template_file": ("template_file", "t"), "template": ("template_file", "t")}


@dataclass(frozen=True)
class Concept:
    """One embedding of a many-embedding run: everything a single run takes from its embedding and data flags."""

    name: str
    train_data_dir: str | None
    dataset_name: str | None
    initializer_token: str
    num_vectors: int
    template_file: str | None
    learning_rate: str
    eval_data_dir: str | None = None  # held-out pictures for its evaluation (--eval_data_dir of its own run)


@dataclass(frozen=True)
class Defaults:
    """What a concept takes from the run's flags where it says nothing."""

    initializer_token: str = "*"
    num_vectors: int = 1
    template_file: str | None = None
    learning_rate: str = "0.005"
    train_data_dir: str | None = None
    dataset_name: str | None = None


def read_entries(path: Path) -> list[dict]:
    """The file's entries as raw mappings (field names as written), in file order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"--concepts {path}: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            # empty cells mean "take the run's flag"
            return [{k.strip(): v.strip() for k, v in r.items() if k and v is not None and v.strip() != ""}
                    for r in rows]
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"--concepts {path}: cannot parse ({e.__class__.__name__}: {' '.join(str(e).split())})"
                        ) from None
    if isinstance(data, dict) and "concepts" in data:
        data = data["concepts"]
    if isinstance(data, dict):  # name -> fields
        entries = []
        for name, fields in data.items():
            if fields is not None and not isinstance(fields, dict):
                raise UserError(f"--concepts {path}: '{name}' should map to its fields (train_data_dir, ...), "
                                f"not {type(fields).__name__}")
            entries.append({"name": name, **(fields or {})})
        data = entries
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise UserError(f"--concepts {path}: expected a list of concepts (each a mapping with name, train_data_dir, "
                        f"...), a 'concepts:' list, or a mapping name -> fields")
    return data


def _int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise UserError(f"{where}: {field} must be a whole number, not {value!r}")
    return int(value)


def concept_from_entry(entry: dict, defaults: Defaults, where: str) -> Concept:
    """One entry, with its fields named any of FIELDS' ways; ``where`` starts every error message."""
    values: dict = {}
    unknown = []
    for key, value in entry.items():
        field = _ALIAS.get(str(key).strip().lower().replace("-", "_"))
        if field is None:
            unknown.append(key)
            continue
        if field in values:
            raise UserError(f"{where}: field {field} is given twice ('{key}')")
        values[field] = value
    if unknown and values.get("name") is not None:
        where = f"{where} ('{values['name']}')"
    if unknown:
        raise UserError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(FIELDS)})")
    name = values.get("name")
    if name is None or str(name).strip() == "":
        raise UserError(f"{where}: no name (every concept needs name: the embedding's name)")
    from utils.embeddings import sanitize_name

    try:
        name = sanitize_name(str(name).strip())
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    where = f"{where} ('{name}')"
    data_dir, dataset = values.get("train_data_dir"), values.get("dataset_name")
    if data_dir is not None and dataset is not None:
        raise UserError(f"{where}: give train_data_dir or dataset_name, not both")
    if data_dir is None and dataset is None:
        data_dir, dataset = defaults.train_data_dir, defaults.dataset_name
        if data_dir is None and dataset is None:
            raise UserError(f"{where}: no data (give train_data_dir or dataset_name, or --train_data_dir for all)")
    if data_dir is not None and not Path(str(data_dir)).is_dir():
        raise UserError(f"{where}: train_data_dir {data_dir}: no such folder")
    vectors = _int(values.get("num_vectors", defaults.num_vectors), where, "num_vectors")
    from utils.embeddings import MAX_VECTORS

    if not 1 <= vectors <= MAX_VECTORS:
        raise UserError(f"{where}: num_vectors must be 1..{MAX_VECTORS} (got {vectors})")
    lr = str(values.get("learning_rate", defaults.learning_rate)).strip()
    from utils.lr_schedule import validate_learning_rate

    try:
        validate_learning_rate(lr)
    except UserError as e:
        message = str(e).replace("--learning_rate ", "")
        raise UserError(f"{where}: learning_rate {lr!r}: {message}") from None
    template = values.get("template_file", defaults.template_file)
    if template is not None:
        template = str(template)
        from utils.data.prompts import PromptConfig, resolve_template

        try:
            resolve_template(PromptConfig(placeholder=name, template_file=template), has_captions=False)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    init = values.get("initializer_token", defaults.initializer_token)
    eval_dir = values.get("eval_data_dir")
    if eval_dir is not None and not Path(str(eval_dir)).is_dir():
        raise UserError(f"{where}: eval_data_dir {eval_dir}: no such folder")
    return Concept(name=name, train_data_dir=None if data_dir is None else str(data_dir),
                   dataset_name=None if dataset is None else str(dataset),
                   initializer_token="" if init is None else str(init), num_vectors=vectors,
                   template_file=template, learning_rate=lr,
                   eval_data_dir=None if eval_dir is None else str(eval_dir))


def check_unique(concepts: list[Concept], what: str) -> None:
    seen: dict[str, int] = {}
    for i, c in enumerate(concepts, start=1):
        # A1111 loads embeddings by name, case-insensitively on Windows; file names would collide the same way.
        key = c.name.lower()
        if key in seen:
            raise UserError(f"{what}: the name '{c.name}' is used twice (entries {seen[key]} and {i}); "
                            f"every embedding needs its own name")
        seen[key] = i


def load_concepts(path: str | Path, defaults: Defaults) -> list[Concept]:
    """Read and check a concepts file (YAML, JSON or CSV): UserError, one line, on the first problem."""
    path = Path(path)
    entries = read_entries(path)
    if not entries:
        raise UserError(f"--concepts {path}: no concepts in the file")
    concepts = [concept_from_entry(e, defaults, f"--concepts {path}: entry {i}")
                for i, e in enumerate(entries, start=1)]
    check_unique(concepts, f"--concepts {path}")
    return concepts


def parse_sweep(text: str) -> list[tuple[str, str, list[str]]]:
    """``"learning_rate=2e-3,5e-3 num_vectors=1,2"`` -> [(field, tag, values), ...] in the order given."""
    out: list[tuple[str, str, list[str]]] = []
    for part in text.split():
        key, eq, values = part.partition("=")
        known = ", ".join(dict.fromkeys(SWEEP_KEYS))
        if not eq or not key:
            raise UserError(f"--sweep: '{part}' should be KEY=V1,V2,... (keys: {known})")
        if key.lower() not in SWEEP_KEYS:
            raise UserError(f"--sweep: unknown key '{key}' (keys: {known})")
        field, tag = SWEEP_KEYS[key.lower()]
        if any(f == field for f, _, _ in out):
            raise UserError(f"--sweep: {field} is given twice")
        vals = [v.strip() for v in values.split(",")]
        if not all(vals):
            raise UserError(f"--sweep: '{part}' has an empty value")
        out.append((field, tag, vals))
    if not out:
        raise UserError("--sweep: nothing to sweep (give KEY=V1,V2,...)")
    return out


def expand_sweep(concepts: list[Concept], sweep: list[tuple[str, str, list[str]]], defaults: Defaults
                 ) -> list[Concept]:
    """Every concept times every combination of the sweep's values: one variant each, named after its values."""
    from utils.embeddings import sanitize_name

    out = []
    for c in concepts:
        for combo in itertools.product(*(vals for _, _, vals in sweep)):
            # '.' would end the name where file names take their suffix (<name>.pt): 0.005 -> 0p005
            suffix = "-".join(f"{tag}{v.replace(' ', '_').replace('.', 'p')}" for (_, tag, _), v in zip(sweep, combo))
            entry = {"name": sanitize_name(f"{c.name}-{suffix}"), "train_data_dir": c.train_data_dir,
                     "dataset_name": c.dataset_name, "initializer_token": c.initializer_token,
                     "num_vectors": c.num_vectors, "template_file": c.template_file, "learning_rate": c.learning_rate,
                     "eval_data_dir": c.eval_data_dir}
            entry.update({field: v for (field, _, _), v in zip(sweep, combo)})
            entry = {k: v for k, v in entry.items() if v is not None}
            out.append(concept_from_entry(entry, defaults, f"--sweep variant {len(out) + 1}"))
    check_unique(out, "--sweep")
    return out


def single_concept(name: str, defaults: Defaults) -> Concept:
    """The run's own flags as one concept (what ``--sweep`` expands without ``--concepts``)."""
    return concept_from_entry({"name": name}, defaults, "the embedding")
