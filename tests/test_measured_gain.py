import json

import pytest
import torch

from sparsetrain.gpu.backends import measured_gain
from sparsetrain.gpu.backends.base import EmulatedBackend


@pytest.fixture
def fresh_gains(monkeypatch, tmp_path):
    """An empty choice cache and no gain known to this process."""
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(measured_gain, "_GAINS", {})
    return tmp_path


def test_a_shape_is_measured_once_and_then_read_from_the_choice_cache(fresh_gains, monkeypatch):
    timed = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(measured_gain, "_measure", lambda backend, out_f, in_f, device, dtype: timed.append(out_f) or 1.25)
    backend, cpu = EmulatedBackend(), torch.device("cpu")
    assert measured_gain.semi24_gain(backend, 4096, 1024, cpu, torch.bfloat16) == 1.25
    assert measured_gain.semi24_gain(backend, 4096, 1024, cpu, torch.bfloat16) == 1.25
    assert timed == [4096]
    stored = json.loads((fresh_gains / "semi24-gains.json").read_text())
    key = measured_gain.gain_key(4096, 1024, cpu, torch.bfloat16, "emulated")
    assert stored == {key: 1.25} and "4096x1024|bfloat16|rows8192|emulated|cpu|torch" in key
    monkeypatch.setattr(measured_gain, "_GAINS", {})  # a new process: the file answers, nothing is timed
    assert measured_gain.semi24_gain(backend, 4096, 1024, cpu, torch.bfloat16) == 1.25
    assert timed == [4096]


def test_nothing_is_timed_inside_a_graph_capture(fresh_gains, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(measured_gain, "_measure", lambda *args: pytest.fail("timed inside a capture"))
    assert measured_gain.semi24_gain(EmulatedBackend(), 4096, 1024, torch.device("cpu"), torch.bfloat16) is None


def test_a_damaged_entry_is_measured_again(fresh_gains, monkeypatch):
    key = measured_gain.gain_key(1024, 1024, torch.device("cpu"), torch.float16, "emulated")
    (fresh_gains / "semi24-gains.json").write_text(json.dumps({key: "fast"}))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(measured_gain, "_measure", lambda *args: 0.8)
    assert measured_gain.semi24_gain(EmulatedBackend(), 1024, 1024, torch.device("cpu"), torch.float16) == 0.8


@pytest.mark.gpu
def test_gpu_measured_gain_of_vit_shapes_is_a_plausible_ratio_and_auto_follows_it(fresh_gains):
    from sparsetrain.gpu.backends import CuSparseLtBackend, resolve_backend

    cuda = torch.device("cuda")
    for out_features, in_features in ((4096, 1024), (1024, 1024)):
        backend, reason = resolve_backend("auto", out_features, in_features, cuda, torch.bfloat16, True)
        forced, _ = resolve_backend("cusparselt", out_features, in_features, cuda, torch.bfloat16, True)
        gain = measured_gain.semi24_gain(forced, out_features, in_features, cuda, torch.bfloat16)  # auto's, cached
        assert len(measured_gain._GAINS) == 1 + (out_features == 1024), "auto timed the shape once"
        assert 0.2 < gain < 4.0, gain
        if gain >= 1.0:
            assert isinstance(backend, CuSparseLtBackend) and f"measured {gain:.2f}x of dense here" in reason
        else:
            assert isinstance(backend, EmulatedBackend) and f"measured {gain:.2f}x of dense" in reason
