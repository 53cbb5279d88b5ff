"""pyddl.jax without ranks: `import pyddl` never imports JAX, and the recipe's optax schedule
is `pyddl train`'s own Recipe, step by step (warmup, linear scaling, batch ramp, decay)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_pyddl_and_pyddl_torch_never_import_jax():
    code = ("import sys, pyddl, pyddl.torch, pyddl.cli.main; "
            "print(sorted(m for m in ('jax', 'jaxlib', 'flax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lr_schedule_is_the_recipe_at_every_step_in_and_out_of_jit():
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    from pyddl.jax import Recipe, lr_schedule

    recipe = Recipe(base_lr=0.1, base_batch=16, epochs=4, train_size=256, batch_ramp=((0, 32), (2, 64)),
                    warmup_epochs=1.5, decay="step", milestones=(3,))
    want = [recipe.at(e, s)[0] for e in range(4) for s in range(recipe.steps_in_epoch(e))]
    assert len(want) == 8 + 8 + 4 + 4
    schedule = lr_schedule(recipe)
    got = [float(schedule(i)) for i in range(len(want))]
    assert got == pytest.approx(want, rel=1e-6)
    assert float(jax.jit(schedule)(len(want) + 5)) == pytest.approx(want[-1], rel=1e-6)  # holds the last rate
    assert got[0] == pytest.approx(0.1, rel=1e-6) and got[1] > got[0]  # gradual warmup, per step
    assert got[12] == pytest.approx(0.2, rel=1e-6)  # warmed up to 0.1 x 32 / 16 at 1.5 epochs
    assert got[16] == pytest.approx(0.4, rel=1e-6)  # epoch 2: the ramp's batch 64 scales it to 0.1 x 64 / 16
    assert got[20] == pytest.approx(0.04, rel=1e-6)  # epoch 3: step decay
