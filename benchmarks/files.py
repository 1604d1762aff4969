"""File writes shared by the studies: a result file that appears whole or not at all, and the generated block of a
docs page (the hand-written text around it is kept)."""

import json
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    """`data` as JSON at `path`, through a rename: a file on disk is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def replace_generated_block(doc: Path, begin: str, end: str, generated: str) -> None:
    """Replace the text from the first `begin` to the next `end` marker of `doc` (markers included) by `generated`."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    doc.write_text(head + generated + rest.split(end, 1)[1])
