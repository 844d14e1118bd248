"""The README's Python example runs as printed (on the CPU) and leaves 2:4-pruned plain linears."""
import re

from torch import nn

from tests.helpers import ROOT


def test_the_readme_example_runs_and_prunes_the_layers_it_names():
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert all(type(layer) is nn.Linear for layer in model if isinstance(layer, nn.Linear))
    for index in (0, 2):
        groups = (model[index].weight != 0).reshape(-1, 4).sum(1)
        assert (groups <= 2).all()
    assert (model[4].weight != 0).all()
