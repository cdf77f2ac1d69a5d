"""benchmarks/policy_calibration.py: acceptance tallied per depth and sibling rank from the rounds' reports."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from eagle3.decoding.policy import RoundReport, TreePlan
from eagle3.decoding.tree import DraftTree, ancestor_mask

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "policy_calibration.py"


@pytest.fixture(scope="module")
def calibration():
    spec = importlib.util.spec_from_file_location("policy_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_ranks_count_accepted_nodes_and_their_probabilities(calibration):
    # The root's children 1 (log p -0.2) and 2 (-1.0); node 3 under node 1 (cumulative -0.5), node 4 under 2.
    parents = [-1, 0, 0, 1, 2]
    tree = DraftTree(torch.arange(5), parents, torch.tensor([0, 1, 1, 2, 2]), ancestor_mask(parents),
                     [[1, 2], [3], [4], [], []], torch.tensor([0.0, -0.2, -1.0, -0.5, -1.5]))  # fmt: skip
    table = calibration.RankTable()
    for path in ([0, 1, 3], [0, 1]):
        table(RoundReport(TreePlan([]), [tree], [path], [10], 1.0, 1.0), None)
    rows = {(r["depth"], r["rank"]): r for r in table.rows()}
    assert rows[(1, 0)]["nodes"] == 2 and rows[(1, 0)]["accepted"] == 2
    assert rows[(1, 0)]["predicted"] == pytest.approx(2 * math.exp(-0.2))
    assert rows[(1, 1)]["accepted"] == 0 and rows[(1, 1)]["given_parent_nodes"] == 2
    assert rows[(2, 0)]["accepted"] == 1 and rows[(2, 0)]["nodes"] == 4  # nodes 3 and 4, twice
    # Conditional on the parent accepted: node 3 twice (its parent, node 1, accepted in both rounds), node 4 never.
    assert rows[(2, 0)]["given_parent_nodes"] == 2
    assert rows[(2, 0)]["given_parent_predicted"] == pytest.approx(2 * math.exp(-0.3), rel=1e-5)
    assert rows[(2, 0)]["given_parent_ratio"] == pytest.approx(1 / (2 * math.exp(-0.3)), rel=1e-5)
    # By the draft's probability given the parent: node 3 (exp(-0.3) = 0.74) lies in the 0.7-0.9 band, at depth 2.
    bands = {(r["depth"], r["p_from"]): r for r in table.confidence_rows()}
    assert bands[(2, 0.7)]["nodes"] == 2 and bands[(2, 0.7)]["accepted_rate"] == 0.5  # accepted in one round of two
    assert bands[(1, 0.3)]["nodes"] == 2 and bands[(1, 0.3)]["accepted_rate"] == 0.0  # node 2 (exp(-1) = 0.37)
