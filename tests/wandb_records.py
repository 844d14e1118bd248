"""Read an offline wandb run file (run-<id>.wandb) without wandb's service: a LevelDB-style log of
32 KiB blocks whose records are wandb's protobuf `Record`s. Tests use it to see what was logged."""
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # ':W&B' + 2-byte magic + version byte at file start; crc32 + length + type per chunk
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read_run(path: Path) -> dict:
    """{'run_id': str, 'history_keys': set, 'config_keys': set, 'kinds': {record type: count}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"run_id": None, "history_keys": set(), "config_keys": set(), "kinds": {}}
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        if kind == "run":
            out["run_id"] = record.run.run_id
        elif kind == "history":
            out["history_keys"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "config":
            out["config_keys"].update(item.key or "/".join(item.nested_key) for item in record.config.update)
    return out
