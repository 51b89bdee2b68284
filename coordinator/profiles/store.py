"""Profile CSV files: a validated loader, an atomic writer, and the merged view with defaults.

A file has a header line with exactly the schema's columns (any order) and one row per line.
Errors name the file, the line (header = line 1) and the field. Within one file a key may appear
once. Across files (`load_profiles`), a row replaces another with the same key when its source
ranks higher (measured > published > derived) or ranks the same and comes from a later file —
so a measured row overrides the shipped default for the same configuration.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from coordinator.profiles.schema import (
    COLUMNS,
    ProfileError,
    ProfileKey,
    ProfileRow,
    Source,
    parse_row,
)
from shapeshifter.common.atomic import atomic_write

_SOURCE_RANK = {Source.DERIVED: 0, Source.PUBLISHED: 1, Source.MEASURED: 2}


def parse_csv(text: str, path: str = "<text>") -> list[ProfileRow]:
    """Parse and validate CSV text; raise ProfileError naming the line and field."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ProfileError("empty file: a header line is required", path=path, line=1) from None
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ProfileError(f"unknown column(s) {unknown}; allowed: {list(COLUMNS)}", path=path,
                           line=1, field=unknown[0])
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ProfileError(f"missing column(s) {missing}", path=path, line=1, field=missing[0])
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise ProfileError(f"column(s) {duplicated} appear more than once", path=path, line=1,
                           field=duplicated[0])

    rows: list[ProfileRow] = []
    first_line: dict[ProfileKey, int] = {}
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise ProfileError(f"has {len(cells)} cells, the header has {len(header)}",
                               path=path, line=line)
        try:
            row = parse_row(dict(zip(header, cells, strict=True)), line)
        except ProfileError as err:
            raise ProfileError(err.reason, path=path, line=line, field=err.field) from None
        if row.key in first_line:
            raise ProfileError(f"duplicate key {row.key} (first on line {first_line[row.key]})",
                               path=path, line=line, field="query_class")
        first_line[row.key] = line
        rows.append(row)
    return rows


def load_csv(path: str | os.PathLike[str]) -> list[ProfileRow]:
    p = Path(path)
    return parse_csv(p.read_text(encoding="utf-8"), str(p))


def to_csv(rows: Iterable[ProfileRow]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_record())
    return buf.getvalue()


def write_csv(path: str | os.PathLike[str], rows: Sequence[ProfileRow]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    Duplicate keys are refused before anything is written.
    """
    text = to_csv(rows)
    parse_csv(text, str(path))  # the file we write must load back
    with atomic_write(path, make_parents=True, encoding="utf-8", newline="") as f:
        f.write(text)


def upsert_csv(path: str | os.PathLike[str], new_rows: Sequence[ProfileRow]) -> list[ProfileRow]:
    """Add rows to a file (created if absent); a new row replaces an old one with the same key."""
    p = Path(path)
    existing = load_csv(p) if p.exists() else []
    merged = {r.key: r for r in existing}
    for row in new_rows:
        merged[row.key] = row
    rows = list(merged.values())
    write_csv(p, rows)
    return rows


def default_rows() -> list[ProfileRow]:
    """The shipped defaults (coordinator/profiles/defaults.csv, package data)."""
    res = resources.files("coordinator.profiles").joinpath("defaults.csv")
    return parse_csv(res.read_text(encoding="utf-8"), "coordinator/profiles/defaults.csv")


def merge(*row_sets: Iterable[ProfileRow]) -> list[ProfileRow]:
    """Merge row sets, later sets overriding earlier ones unless their source ranks lower."""
    merged: dict[ProfileKey, ProfileRow] = {}
    for rows in row_sets:
        for row in rows:
            old = merged.get(row.key)
            if old is None or _SOURCE_RANK[row.source] >= _SOURCE_RANK[old.source]:
                merged[row.key] = row
    return list(merged.values())


def load_profiles(paths: Sequence[str | os.PathLike[str]] = (),
                  include_defaults: bool = True) -> list[ProfileRow]:
    """Shipped defaults (unless excluded) merged with the given files, in order."""
    sets: list[list[ProfileRow]] = [default_rows()] if include_defaults else []
    sets.extend(load_csv(p) for p in paths)
    return merge(*sets)
