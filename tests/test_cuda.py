"""The CUDA path: a meta-training step (PyG backend, additive and gate edits) gives the same losses
and gradients on a GPU as on the CPU. Skipped where no GPU is present (CI); run on a GPU machine."""

import pytest
import torch

from conftest import randomize_state
from metanet import network_to_graph
from metanet.meta_training import member_step
from metanet.objectives import EditMember
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of
from metanet.sparsity import GroupSparsity
from metanet.graph import graph_to_params
from zoo.arch import build_model, resnet_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["torch", "pyg"])
@pytest.mark.parametrize("edit", ["additive", "gate"])
def test_meta_training_step_on_cuda_matches_the_cpu(edit, backend):
    torch.manual_seed(0)
    model = randomize_state(build_model(resnet_spec(8, (4, 8, 8), shortcut="projection")))
    x = torch.zeros(1, 3, 16, 16)
    graph = network_to_graph(model, x)
    sparsity = GroupSparsity(model, x, reg=0.1, alpha=16)
    weights = sparsity.group_weights(graph_to_params(graph, model))
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(2)]
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        net = MetaNetwork(MetaNetConfig(edge_widths=edge_widths_of([graph]), hidden=16, layers=2, residual=0.1,
                                        backend=backend, edit=edit, evidence=edit != "additive"))
        if edit != "additive":  # gates that differ from 1, so the step exercises them
            torch.nn.init.normal_(net.gate_decoder[-1].weight, std=0.5)
        net.to(device)
        member = EditMember("m", graph.to(device), model.to(device).eval(), sparsity, sparsity_form="group",
                        group_weights=weights.to(device))
        terms = member_step(net, member, [(a.to(device), b.to(device)) for a, b in batches])
        results[device] = terms, {k: p.grad.cpu() for k, p in net.named_parameters() if p.grad is not None}
    (cpu_terms, cpu_grads), (gpu_terms, gpu_grads) = results["cpu"], results["cuda"]
    for k in cpu_terms:
        assert gpu_terms[k] == pytest.approx(cpu_terms[k], rel=1e-4, abs=1e-6), k
    assert cpu_grads.keys() == gpu_grads.keys() and cpu_grads
    for k in cpu_grads:
        torch.testing.assert_close(gpu_grads[k], cpu_grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_two_four_pruned_linear_runs_on_sparse_tensor_cores():
    """A Linear layer pruned 2:4 by metanet.weight_pruning is a weight torch's semi-structured
    kernels take (compute capability >= 8.0), and their product is the dense one's."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 kernels need compute capability 8.0 or newer")
    from torch.sparse import to_sparse_semi_structured

    from metanet.criteria import criterion
    from metanet.levels import Level
    from metanet.weight_pruning import WeightPruning, make_permanent, nm_violations, sparsify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    sparsify(model, WeightPruning(nm=(2, 4), dense_ends=False), criterion("magnitude", Level.WEIGHTS))
    make_permanent(model)
    assert not nm_violations(model, ["0", "2"], 2, 4)
    w = model[0].weight.detach().half().cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.nn.functional.linear(x, to_sparse_semi_structured(w)),
                               torch.nn.functional.linear(x, w), rtol=1e-2, atol=1e-2)
