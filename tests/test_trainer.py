"""transformers.Trainer with lora_kernels: an injected model and a converted PeftModel train, save a
checkpoint, resume from it exactly (step, optimizer state, RNG: the resumed losses and weights equal
an uninterrupted run's), and the adapter they save loads in PEFT with equal logits."""
import os

import pytest
import torch

import lora_kernels as lk
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, SAVE_AT = 4, 2


def _dataset(n=16, seq=12, seed=0):
    """Two sequences, each repeated: every batch can be learnt, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, seq), generator=g).repeat(n // 2, 1)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=SAVE_AT, report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw)


class RecordingTrainer(transformers.Trainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.step_losses = []

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
        loss = out[0] if return_outputs else out
        self.step_losses.append(float(loss.detach()))
        return out


def _injected():
    model = tiny_llama(0).train()
    lk.inject(model, lk.LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=TARGETS))
    return model


def _converted():
    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                               target_modules=TARGETS, task_type="CAUSAL_LM"))
    converted, skipped = lk.peft.convert(model)
    assert len(converted) == 2 * len(TARGETS) and not skipped
    return model.train()


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(make, out, resume=None):
    torch.manual_seed(0)
    model = make()
    trainer = RecordingTrainer(model=model, args=_args(out), train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("make", [_injected, _converted], ids=["inject", "convert"])
def test_trainer_trains_checkpoints_and_resumes(make, tmp_path):
    model, full = _train(make, tmp_path / "full")
    assert full.state.global_step == STEPS and len(full.step_losses) == STEPS
    assert full.step_losses[-1] < full.step_losses[0]  # it trains
    weights = _trainable(model)
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "rng_state.pth").exists()

    # resume from the step-2 checkpoint: steps 3 and 4 (dropout seeds included) as in the full run
    resumed_model, resumed = _train(make, tmp_path / "full", resume=str(ckpt))
    assert resumed.state.global_step == STEPS and len(resumed.step_losses) == STEPS - SAVE_AT
    assert resumed.step_losses == pytest.approx(full.step_losses[SAVE_AT:], rel=1e-6)
    resumed_weights = _trainable(resumed_model)
    assert weights.keys() == resumed_weights.keys() and weights
    for n in weights:
        torch.testing.assert_close(resumed_weights[n], weights[n], rtol=1e-6, atol=1e-7, msg=n)

    # without the optimizer state the same resume lands elsewhere: the check above can fail
    os.remove(ckpt / "optimizer.pt")
    cold_model, _ = _train(make, tmp_path / "full", resume=str(ckpt))
    cold = _trainable(cold_model)
    assert max((cold[n] - weights[n]).abs().max().item() for n in weights) > 1e-4

    # the trained adapter, saved, loads in plain PEFT with equal logits
    ids = _dataset(n=2, seed=5)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    adapter_dir = tmp_path / "adapter"
    if isinstance(model, peft.PeftModel):
        model.save_pretrained(adapter_dir)
    else:
        lk.save_adapter(model, adapter_dir)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), adapter_dir).eval()
    assert not any(getattr(type(m), "_lora_kernels_fused", False) for m in loaded.modules())  # PEFT's own layers
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    base = tiny_llama(0)(input_ids=ids).logits.detach()
    assert (ours - base).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
