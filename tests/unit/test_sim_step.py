"""Step model: bucketing in ready order, the one-at-a-time queue, exposure; per-layer facts."""

import math
from dataclasses import replace

import pytest
import torch

from pyddl.sim.cluster import DeviceSpec, StackSpec, load_cluster
from pyddl.sim.cost import allreduce_s, expected_max_normal
from pyddl.sim.step import (
    SGD_BYTES_PER_PARAM,
    Gradient,
    StepProfile,
    build_model,
    count_flops,
    device_flops_per_s,
    flop_profile,
    load_profile,
    measure_profile,
    predict_scaling,
    simulate_step,
)

MB = 1_000_000


def toy(ready=(1.0, 2.0, 3.0), numel=MB // 4, forward=0.5, optimizer=0.25):
    grads = tuple(Gradient(f"g{i}", numel, 4, t) for i, t in enumerate(ready))
    return StepProfile("toy", 8, forward, ready[-1], optimizer, grads, "hand")


def test_exposure_by_hand_one_gradient_per_bucket():
    # Buckets ready at 1, 2, 3 s, each allreduce 1.5 s: runs 1-2.5, 2.5-4, 4-5.5; backward
    # ends at 3, so 2.5 s are exposed.
    pred = simulate_step(toy(), lambda n: 1.5, bucket_bytes=MB)
    assert [(b.ready_s, b.start_s, b.end_s) for b in pred.buckets] == [(1, 1, 2.5), (2, 2.5, 4), (3, 4, 5.5)]
    assert pred.exposed_s == pytest.approx(2.5)
    assert pred.step_s == pytest.approx(0.5 + 3 + 2.5 + 0.25)
    assert pred.comm_s == pytest.approx(4.5)


def test_bucket_waits_for_its_last_gradient_and_hides_behind_backward():
    # Cap 2 MB: the first two gradients share a bucket ready at 2 s; the third goes alone.
    pred = simulate_step(toy(ready=(1.0, 2.0, 6.0)), lambda n: n / MB * 0.5, bucket_bytes=2 * MB)
    assert [(b.nbytes, b.ready_s, b.start_s, b.end_s) for b in pred.buckets] == [(2 * MB, 2, 2, 3), (MB, 6, 6, 6.5)]
    assert pred.exposed_s == pytest.approx(0.5)


def test_communication_cpu_comes_out_of_backward_where_they_share_the_cores():
    # 0.2 s of CPU per bucket, 3 buckets: backward (3 s) takes 3.6 s and each gradient is
    # ready 1.2x later, at 1.2, 2.4, 3.6; allreduces of 0.5 s run 1.2-1.7, 2.4-2.9, 3.6-4.1.
    pred = simulate_step(toy(), lambda n: 0.5, bucket_bytes=MB, cpu_s=lambda n: 0.2)
    assert [(b.ready_s, b.end_s) for b in pred.buckets] == [pytest.approx((1.2, 1.7)), pytest.approx((2.4, 2.9)),
                                                           pytest.approx((3.6, 4.1))]
    assert pred.comm_cpu_s == pytest.approx(0.6) and pred.exposed_s == pytest.approx(0.5)
    assert pred.step_s == pytest.approx(0.5 + 3 + 0.6 + 0.5 + 0.25)


def test_free_communication_exposes_nothing():
    pred = simulate_step(toy(), lambda n: 0.0)
    assert pred.exposed_s == 0 and pred.step_s == pytest.approx(0.5 + 3 + 0.25)


def test_oversized_gradient_gets_its_own_bucket():
    grads = (Gradient("big", 10 * MB, 1, 1.0, "uint8"), Gradient("small", 10, 1, 2.0, "uint8"))
    pred = simulate_step(StepProfile("t", 1, 0, 2, 0, grads, "hand"), lambda n: 0.1, bucket_bytes=MB)
    assert [b.nbytes for b in pred.buckets] == [10 * MB, 10]


def test_count_flops_of_two_linear_layers():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    rows = count_flops(model, (2, 8))
    # forward 2*batch*in*out; backward computes weight grads (and input grads past layer 0).
    assert [(r["name"], r["fwd_flops"], r["bwd_flops"]) for r in rows] == [("0", 128, 128), ("2", 48, 96)]
    assert [p[:3] for p in rows[0]["params"]] == [("0.weight", 32, 4), ("0.bias", 4, 4)]


def test_count_flops_marks_modules_never_called():
    class WithSpare(torch.nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))  # self[2] is owned and never called

    with torch.device("meta"):
        model = WithSpare(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    rows = count_flops(model, (2, 8))
    # The counter has no formula for BatchNorm: called, and zero FLOPs all the same.
    assert [(r["name"], r["called"], r["bwd_flops"] == 0) for r in rows] == [
        ("0", True, False), ("1", True, True), ("2", False, True)]


def test_flop_profile_gives_zero_flop_layers_the_ready_time_of_their_place():
    # BatchNorm counts no FLOPs, yet backward reaches it in the middle of the model: its
    # gradients are ready when the layers after it are done, not at the end of backward.
    prof = flop_profile("resnet18", 16, small_device(), image_size=32)
    ready = {g.name: g.ready_s for g in prof.gradients}
    assert ready["layer4.1.bn2.weight"] == ready["fc.weight"] < ready["layer4.1.conv2.weight"]
    assert ready["layer1.0.bn1.weight"] == ready["layer1.0.conv2.weight"] < ready["layer1.0.conv1.weight"]
    assert [n for n, t in ready.items() if t == pytest.approx(prof.backward_s, rel=1e-9)] == ["conv1.weight"]


def small_device(model="resnet18", ips=1000.0, batch=16, size=32):
    return DeviceSpec("test-gpu", model, batch, ips, 500.0, size)


def test_flop_profile_reproduces_the_reference_throughput():
    dev = small_device()
    prof = flop_profile("resnet18", 16, dev, image_size=32)
    step = prof.forward_s + prof.backward_s + prof.optimizer_s
    assert step == pytest.approx(16 / 1000.0, rel=1e-9)
    n_params = sum(g.numel for g in prof.gradients)
    assert prof.optimizer_s == pytest.approx(n_params * SGD_BYTES_PER_PARAM / 500e9)
    ready = [g.ready_s for g in prof.gradients]
    assert ready == sorted(ready) and ready[-1] == pytest.approx(prof.backward_s)
    assert prof.gradients[0].name.startswith("fc.") and prof.gradients[-1].name == "conv1.weight"
    # Twice the batch, twice the compute (FLOPs are linear in the batch).
    assert flop_profile("resnet18", 32, dev, image_size=32).backward_s == pytest.approx(2 * prof.backward_s)
    assert device_flops_per_s(dev) > 0
    # Another size than the reference's: its own FLOPs at the rate the reference sets.
    rows = count_flops(build_model("resnet18", device="meta"), (1, 3, 64, 64))
    big = flop_profile("resnet18", 16, dev, image_size=64)
    flops = 16 * sum(r["fwd_flops"] + r["bwd_flops"] for r in rows)
    assert big.forward_s + big.backward_s == pytest.approx(flops / device_flops_per_s(dev), rel=1e-9)


def test_measured_profile_orders_gradients_in_reverse_layer_order(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    prof = measure_profile(model, 4, (16,), repeats=2, name="mlp", num_classes=10)
    names = [g.name for g in prof.gradients]
    assert set(names[:2]) == {"2.weight", "2.bias"} and set(names[2:]) == {"0.weight", "0.bias"}
    assert all(0 <= g.ready_s <= prof.backward_s for g in prof.gradients)
    assert prof.gradient_bytes == 4 * sum(p.numel() for p in model.parameters())
    # The spread of the two timed steps, kept in the file: two samples' sample CV is at most
    # sqrt(2), reached as one step dwarfs the other (a sub-millisecond step on a busy machine).
    assert 0 <= prof.step_cv <= 2 ** 0.5
    path = tmp_path / "p.json"
    prof.save(str(path))
    again = load_profile(str(path))
    assert again == prof


def test_load_profile_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x"}')
    with pytest.raises(ValueError, match="not a pyddl step profile"):
        load_profile(str(bad))


def test_build_model_rejects_unknown_names_with_close_matches():
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet5O")
    assert sum(p.numel() for p in build_model("resnet18", device="meta").parameters()) == 11_689_512


def test_predict_scaling_rows_are_consistent():
    cluster = load_cluster("powerai-ddl-2017")
    prof = toy(ready=(0.01, 0.02, 0.03), numel=4 * MB)
    rows = predict_scaling(prof, cluster, [1, 4, 256], ["native", "multiring"])
    assert [(r["gpus"], r["algorithm"]) for r in rows] == [
        (g, a) for g in (1, 4, 256) for a in ("native", "multiring")]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(r["gpus"] * prof.batch / r["step_s"])
        assert 0 < r["scaling_efficiency"] <= 1
    assert rows[0]["scaling_efficiency"] == 1.0 and rows[0]["exposed_s"] == 0
    at256 = {r["algorithm"]: r for r in rows if r["gpus"] == 256}
    assert at256["native"]["topology"] == "4x64"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_profile_on_cuda_dates_gradients_after_their_kernels():
    model = build_model("resnet18", device="cuda")
    prof = measure_profile(model, 8, (3, 64, 64), repeats=2, name="resnet18")
    ready = [g.ready_s for g in prof.gradients]
    assert prof.gradients[-1].name == "conv1.weight"
    assert 0 < ready[0] < ready[-1] <= prof.backward_s * 1.001


def test_the_2017_ddl_hardware_alone_as_docs_simulate_md_reports_it():
    # docs/simulate.md's hardware-only table: ResNet-50, 32 per GPU, 256 GPUs, 25 MiB buckets
    # and 4 MiB chunks, the [stack] terms off: the model as it was before they existed.
    pytest.importorskip("torchvision")
    cluster = replace(load_cluster("powerai-ddl-2017"), stack=StackSpec())
    profile = flop_profile("resnet50", 32, cluster.device, 224, 1000)
    eff = {(r["algorithm"], r["topology"]): round(r["scaling_efficiency"], 3)
           for ring_max in (None, 16)
           for r in predict_scaling(profile, cluster, [256], ["native", "multiring"], 25 * 2**20, 4 * 2**20, ring_max)}
    assert eff == {("native", "4x64"): 0.965, ("multiring", "4x64"): 0.976,
                   ("native", "4x16x4"): 0.965, ("multiring", "4x16x4"): 0.981}


# ---- the [stack] terms (issue 22) -----------------------------------------------------------


def _bare(**stack):
    """The DDL cluster's hardware with only the given [stack] terms."""
    return replace(load_cluster("powerai-ddl-2017"), stack=StackSpec(**stack))


def _step(cluster, gpus, prof, alg="multiring", **kw):
    return predict_scaling(prof, cluster, [gpus], [alg], MB, **kw)[0]


def test_zero_terms_reduce_to_the_model_without_them():
    prof = toy(ready=(0.01, 0.02, 0.03), numel=4 * MB)
    cluster = _bare()
    for gpus in (4, 16, 256):
        fabric = cluster.fabric(gpus)
        plain = simulate_step(prof, lambda n: allreduce_s(fabric, "multiring", n), MB)
        row = _step(cluster, gpus, prof)
        assert row["step_s"] == pytest.approx(plain.step_s, rel=1e-12)
        assert row["straggler_s"] == 0 and row["fixed_s"] == 0


@pytest.mark.parametrize("cv", [0.005, 0.01, 0.05])
def test_straggler_wait_is_the_expected_max_of_n_worker_steps(cv):
    prof = toy(ready=(0.01, 0.02, 0.03), numel=4 * MB)
    compute = prof.forward_s + prof.backward_s + prof.optimizer_s
    waits = []
    for gpus in (1, 4, 16, 64, 256):
        with_cv = _step(_bare(step_cv=cv), gpus, prof)
        without = _step(_bare(), gpus, prof)
        expect = cv * compute * expected_max_normal(gpus)
        assert with_cv["step_s"] - without["step_s"] == pytest.approx(expect, rel=1e-9)
        waits.append(with_cv["straggler_s"])
    assert waits[0] == 0 and all(a < b for a, b in zip(waits, waits[1:]))  # monotone in n
    # The CLI's --step-cv overrides the cluster's.
    assert _step(_bare(step_cv=cv), 256, prof, step_cv=2 * cv)["straggler_s"] == pytest.approx(2 * waits[-1])


def test_call_cost_and_host_staging_lengthen_each_collective():
    # One 16 MB gradient ready when backward ends: its whole collective is exposed.
    prof = toy(ready=(0.03,), numel=4 * MB)
    nbytes = 16 * MB
    for gpus in (4, 256):
        base = _step(_bare(), gpus, prof)
        call = _step(_bare(call_us=250.0), gpus, prof)
        staged = _step(_bare(staging_gb_per_s=10.0), gpus, prof)
        assert call["exposed_s"] - base["exposed_s"] == pytest.approx(250e-6)
        # Staging copies to host and back only where the collective crosses servers.
        copies = 2 * nbytes / 10e9 if gpus > 4 else 0.0
        assert staged["exposed_s"] - base["exposed_s"] == pytest.approx(copies, abs=1e-12)
    # One GPU runs no collective: neither term applies.
    assert _step(_bare(call_us=250.0, staging_gb_per_s=10.0), 1, prof)["step_s"] == pytest.approx(
        prof.forward_s + prof.backward_s + prof.optimizer_s)


def test_no_overlap_starts_every_collective_when_backward_ends():
    prof = toy()  # gradients ready at 1, 2, 3 s, 1 MB each, one per bucket
    pred = simulate_step(prof, lambda n: 1.5, bucket_bytes=MB, overlap=False)
    assert [(b.start_s, b.end_s) for b in pred.buckets] == [(3, 4.5), (4.5, 6), (6, 7.5)]
    assert pred.exposed_s == pytest.approx(4.5)


def test_bucket_zero_makes_one_bucket_per_layer():
    grads = (Gradient("fc.bias", 10, 4, 0.1), Gradient("fc.weight", 1000, 4, 0.1),
             Gradient("bn.bias", 5, 4, 0.2), Gradient("bn.weight", 5, 4, 0.2), Gradient("conv.weight", 99, 4, 0.3))
    prof = StepProfile("toy", 1, 0.1, 0.3, 0.0, grads, "hand")
    pred = simulate_step(prof, lambda n: 0.01, bucket_bytes=0)
    assert [b.nbytes for b in pred.buckets] == [4040, 40, 396]


def test_fixed_costs_and_per_step_allreduces():
    prof = toy(ready=(0.01, 0.02, 0.03), numel=4 * MB)
    plain = {g: _step(_bare(), g, prof) for g in (1, 16)}
    fixed = {g: _step(_bare(step_fixed_us=2000.0), g, prof) for g in (1, 16)}
    for g in (1, 16):  # paid at every worker count
        assert fixed[g]["step_s"] - plain[g]["step_s"] == pytest.approx(2e-3)
    small = _bare(call_us=10.0, step_allreduces=2)
    one, sixteen = _step(small, 1, prof), _step(small, 16, prof)
    assert one["fixed_s"] == 0  # nothing to reduce on one GPU
    expect = 2 * (10e-6 + allreduce_s(small.fabric(16), "multiring", 16))
    assert sixteen["fixed_s"] == pytest.approx(expect)


def test_efficiency_against_a_baseline_count():
    prof = toy(ready=(0.01, 0.02, 0.03), numel=4 * MB)
    cluster = _bare(step_cv=0.01)
    rows = predict_scaling(prof, cluster, [8, 256], ["multiring"], MB, baseline_gpus=8)
    assert rows[0]["scaling_efficiency"] == pytest.approx(1.0)
    assert rows[1]["scaling_efficiency"] == pytest.approx(rows[0]["step_s"] / rows[1]["step_s"])
    assert rows[1]["baseline_gpus"] == 8
    with pytest.raises(ValueError, match="fraction from 0 to 1"):
        predict_scaling(prof, cluster, [8], ["multiring"], MB, step_cv=1.5)
    assert math.isclose(rows[1]["straggler_s"], 0.01 * (prof.forward_s + prof.backward_s + prof.optimizer_s)
                        * expected_max_normal(256))
