"""Read an offline W&B run (`run-<id>.wandb`) back with wandb's own protobuf classes.

wandb 0.31 has no Python reader for its transaction log (the old `datastore` module is gone;
the Go core reads it), yet a test, or a user on a cluster without network, wants to see what a
job logged. The format is small:

    7-byte file header: ":W&B", magic 0xBEE1 (uint16 LE), version (uint8)
    then LevelDB-log framing: 32 KiB blocks of chunks, each headed by
      crc32 (uint32 LE), length (uint16 LE), type (uint8: 1 full, 2 first, 3 middle, 4 last)
    a block with fewer than 7 bytes left is zero-padded; a record is one chunk (full) or
    first + middle* + last, and its bytes are one `wandb_internal_pb2.Record`.

The crc is zlib's crc32 of the payload seeded with the crc32 of the type byte, as in
LevelDB's log format; a mismatch means a torn write (a job killed mid-record), so reading
stops there, like wandb's own reader does.

    run = read_run(next(find_runs("runs/byol/quickstart")))
    run.history  # [{"_step": 10, "train/loss": 0.91, ...}, ...]
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

from core.errors import UserError

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    config: Dict[str, object] = field(default_factory=dict)
    history: List[Dict[str, object]] = field(default_factory=list)
    summary: Dict[str, object] = field(default_factory=dict)
    # The run's exit record is in the file. W&B's writer is another process: for a moment after
    # run.finish() returns (or while a job runs) the file can still lack its last records.
    finished: bool = False

    def metric(self, key: str) -> List[object]:
        """Every logged value of `key`, in order."""
        return [row[key] for row in self.history if key in row]


def find_runs(root: str | Path) -> List[Path]:
    """The .wandb files of every offline run under `root` (a resumed run has one per restart)."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))


def last_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest step whose history row W&B wrote to any file of run `run_id` under
    `wandb_dir` (offline and online runs alike keep this file), -1 if none."""
    steps = [-1]
    for path in Path(wandb_dir).glob(f"*/run-{run_id}.wandb"):
        try:
            steps += [row.get("_step", -1) for row in read_run(path).history]
        except UserError:  # killed before its header was written: nothing in it
            pass
    return max(steps)


def read_records(path: str | Path) -> Iterator[bytes]:
    """The payload of each record in a .wandb file, in order."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise UserError(f"{path} is not a W&B run file (too short)")
    ident, magic, _version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise UserError(f"{path} is not a W&B run file (header {ident!r}, magic {magic:#x})")
    pos, pending = HEADER.size, b""
    while True:
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # trailer padding: the next chunk starts a new block
            pos += left_in_block
        if pos + CHUNK.size > len(data):
            return
        crc, length, kind = CHUNK.unpack_from(data, pos)
        payload = data[pos + CHUNK.size: pos + CHUNK.size + length]
        if kind not in TYPE_CRC or len(payload) < length or zlib.crc32(payload, TYPE_CRC[kind]) != crc:
            return  # a torn or unwritten tail (the job was killed mid-write, or zero padding)
        pos += CHUNK.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        else:
            yield pending + payload
            pending = b""


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: str | Path) -> OfflineRun:
    """Run metadata, config, every history row and the summary of one .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun(Path(path))
    for payload in read_records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group, run.name = r.run_id, r.project, r.run_group, r.display_name
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.finished = True
    return run
