"""research/exit_gate.py reads exits off recorded trajectories: the oracle stops at the first pass
within delta of the last pass's loss, a rule that never fires runs every pass, and the learned gate
fits a signal that the features carry."""

import importlib.util
import os

import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location('exit_gate', os.path.join(REPO, 'research', 'exit_gate.py'))
exit_gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exit_gate)


def test_the_oracle_and_a_rule_that_never_fires():
    exit_gate.delta, exit_gate.passes = 0.01, 4
    losses = torch.tensor([[2.0, 1.0, 1.005, 1.0],    # settled after pass 2
                           [1.0, 1.0, 1.0, 1.0],      # settled at once
                           [3.0, 2.5, 2.2, 2.0]])     # only at the last pass
    assert exit_gate.oracle_exit(losses).tolist() == [2, 1, 4]
    flags = torch.tensor([[False, True, True, True], [False] * 4, [True] * 4])
    assert exit_gate.first_pass_where(flags).tolist() == [2, 4, 1]


def test_the_gate_learns_a_stop_signal_the_features_carry():
    """A feature that says 'settled' (1 from the oracle's pass on) is what the gate reads."""
    torch.manual_seed(0)
    exit_gate.delta, exit_gate.passes = 0.0, 4
    settle = torch.randint(1, 5, (200,))
    k = torch.arange(1, 5)[None]
    losses = torch.where(k >= settle[:, None], 1.0, 2.0)
    feats = torch.stack((torch.randn(200, 4), (k >= settle[:, None]).float().expand(200, 4)), -1)
    gate = exit_gate.fit_gate(feats, losses)
    assert torch.equal(exit_gate.first_pass_where(gate(feats) > 0.5), exit_gate.oracle_exit(losses))
