"""DDP on CPU (gloo, 2 processes): every rank holds the same masks after each update, the sparsity state is
saved once (rank 0) and restored on every rank, and a DDP run resumes."""
import json
import re

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from sparsetrain.sparse.config import Semi24Config
from sparsetrain.sparse.section import build_sparsity
from sparsetrain.sparse.sparsify import mask_checksum, sparsify_
from sparsetrain.training.consistency import MaskDivergenceError, _require_agreement
from sparsetrain.training.resumable import read_metric_rows
from tests.helpers import TINY, compose_cfg
from tests.resume_helpers import load, output_of, start_cli

DDP = ["recipe=fmnist_vit_24", *TINY, "data.train_size=64", "trainer.max_epochs=100", "model.depth=2",
       "model.embed_dim=64", "model.num_heads=2", "trainer.accelerator=cpu", "trainer.devices=2",
       "trainer.strategy=ddp", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.sparsity_log_every=1",
       "trainer.log_every_n_steps=1"]


def run_ddp(args, cwd, timeout=300):
    proc = start_cli(args, cwd=cwd)
    try:
        returncode = proc.wait(timeout=timeout)
    finally:
        proc.kill()
    out = output_of(cwd)
    assert returncode == 0, out[-4000:]
    return out


def agreement_lines(out: str) -> list:
    """(step, [digest per rank]) of each 'masks agree on all N ranks' line."""
    found = re.findall(r"masks agree on all 2 ranks at step (\d+) \(.*\): mask digests \[(\d+), (\d+)\]", out)
    return [(int(step), [int(a), int(b)]) for step, a, b in found]


def ranks_agreeing(run_dir) -> list:
    """(step, value) of each metrics.csv row with sparsity/ranks_agreeing."""
    rows = read_metric_rows(run_dir / "csv" / "metrics.csv")
    return [(int(r["step"]), r["sparsity/ranks_agreeing"]) for r in rows if "sparsity/ranks_agreeing" in r]


def digest_of_checkpoint(path, cfg) -> int:
    model = instantiate(cfg.model)
    build_sparsity(model, cfg.sparsity)
    state = {k.removeprefix("model."): v for k, v in load(path)["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return mask_checksum(model)


def test_ddp_ranks_hold_the_same_masks_and_resume_restores_them_on_every_rank(tmp_path):
    root = tmp_path / "runs"
    run_dir = root / "fmnist_vit_24" / "default"
    out = run_ddp([*DDP, "trainer.max_steps=3", f"paths.root={root}"], tmp_path)
    assert agreement_lines(out)[0][0] == 0
    # every step: the digests of both ranks were gathered and matched rank 0's
    assert ranks_agreeing(run_dir) == [(step, "2.0") for step in range(3)]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]  # saved once
    saved = digest_of_checkpoint(run_dir / "checkpoints" / "last.ckpt", compose_cfg(DDP, run_dir))

    out = run_ddp([*DDP, "trainer.max_steps=5", "resume=auto", f"paths.root={root}"], tmp_path)
    (step, digests), = agreement_lines(out)
    assert step == 3 and digests == [saved, saved], "every rank restored the masks rank 0 saved"
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 5
    rows = [r for r in read_metric_rows(run_dir / "csv" / "metrics.csv") if "train/loss" in r]
    assert [int(r["step"]) for r in rows] == list(range(5))
    assert ranks_agreeing(run_dir) == [(step, "2.0") for step in range(5)]


def test_mask_checksum_tells_transposable_masks_apart_and_disagreement_stops_the_run():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)) for _ in range(2)]
    for model in models:
        sparsify_(model, Semi24Config(transposable=True))
    first, second = (mask_checksum(m) for m in models)
    assert first != second and mask_checksum(models[0]) == first
    _require_agreement([first, first], step=7, when="after the mask update")
    with pytest.raises(MaskDivergenceError, match=r"step 7 .*per rank \[\d+, \d+\].*same checkpoint"):
        _require_agreement([first, second], step=7, when="after the mask update")
