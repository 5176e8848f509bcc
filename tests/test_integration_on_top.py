"""A framework that clips in front of a clipping fusedopt optimizer, without fusedopt's
integration, is named in a warning at the first step, with the fix; with the integration, or
when only one side clips, nothing is said. The oracle for "the framework clipped" is the
framework's own setting (TrainingArguments.max_grad_norm, Trainer(gradient_clip_val=...)),
whose clip these runs check did happen: the optimizer's grad_norm never exceeds it."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import fusedopt
from fusedopt.integrations.lightning import FusedOptCallback
from fusedopt.integrations.transformers import FusedTrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=50):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fusedopt_warnings(caught):
    return [str(w.message) for w in caught if "fusedopt" in str(w.message)]


def hf_run(tmp_path, trainer_cls, max_grad_norm, opt_clip):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                       n_positions=16))
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, max_grad_norm=opt_clip)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", max_grad_norm=max_grad_norm,
                             logging_steps=1)
    trainer = trainer_cls(model=model, args=args, train_dataset=Tokens(),
                          optimizers=(opt, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return fusedopt_warnings(caught), norms


def test_hf_trainer_clipping_on_top_is_named(tmp_path):
    said, norms = hf_run(tmp_path, Trainer, 0.01, 2.0)
    assert len(said) == 1, said  # once, at the first step
    assert "TrainingArguments.max_grad_norm=0.01" in said[0] and "FusedTrainer" in said[0]
    # the Trainer's norms are pre-clip (well above 0.01): it did clip to 0.01 before the step
    assert min(norms) > 0.01


@pytest.mark.parametrize("trainer_cls,max_grad_norm,opt_clip", [
    (Trainer, 0.0, 2.0),          # only fusedopt clips
    (Trainer, 1.0, None),         # only the Trainer clips
    (FusedTrainer, 2.0, 2.0),     # the integration: one clip, in the optimizer
])
def test_hf_one_clip_is_not_named(tmp_path, trainer_cls, max_grad_norm, opt_clip):
    said, _ = hf_run(tmp_path, trainer_cls, max_grad_norm, opt_clip)
    assert said == []


class Regression(pl.LightningModule):
    def __init__(self, opt_clip):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(8, 1)
        self.opt_clip = opt_clip

    def training_step(self, batch, _):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self):
        return fusedopt.AdamW(self.parameters(), lr=1e-2, max_grad_norm=self.opt_clip)


def lightning_run(tmp_path, callbacks, clip_val, opt_clip):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g),
                                          100 + torch.randn(32, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=clip_val,
                         callbacks=callbacks, default_root_dir=tmp_path)
    module = Regression(opt_clip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return fusedopt_warnings(caught), trainer.optimizers[0]


def test_lightning_clipping_on_top_is_named(tmp_path):
    said, opt = lightning_run(tmp_path, [], 0.01, 5.0)
    assert len(said) == 1, said
    assert "gradient_clip_val=0.01" in said[0] and "FusedOptCallback" in said[0]
    # Lightning clipped inside the step's closure, before fusedopt measured: its norm is <= 0.01
    assert float(opt.grad_norm) <= 0.01 + 1e-6


def test_lightning_with_the_callback_is_not_named(tmp_path):
    said, opt = lightning_run(tmp_path, [FusedOptCallback()], 5.0, 5.0)
    assert said == []
    assert float(opt.grad_norm) > 5.0  # the optimizer saw the unclipped gradients
