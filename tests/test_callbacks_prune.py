"""lightning_interp.callbacks.prune: PruneFlaggedFilters on a user's module fed plain dataloaders; round_to; the
saved file loads without pickle into the user's module; with and without a fine-tune on the samples not flagged."""

import pytest
import torch
from conftest import make_trainer
from test_user_models import UserModule, loaders, tiny_net

from lightning_interp.callbacks import InterpReport, PruneFlaggedFilters, load_pruned


def test_prune_evaluates_on_the_dataloaders_given_to_fit(tmp_path):
    prune = PruneFlaggedFilters({"net.2": [1, 2]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())  # no datamodule: the validation loader given to fit
    net, summary = load_pruned(tmp_path / "pruned.pt", tiny_net())
    assert summary["channels"]["0"] == [8, 6]
    assert 0.0 <= summary["val_acc_before"] <= 1.0 and 0.0 <= summary["val_acc_after"] <= 1.0


def test_prune_rounds_channel_counts_and_saves_without_pickle(tmp_path):
    with pytest.raises(ValueError, match=r"`round_to` to be None or an integer >= 1 but got 0"):
        PruneFlaggedFilters({"net.2": [1]}, model_attr="net", round_to=0)
    prune = PruneFlaggedFilters({"net.2": [1, 2]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"), round_to=4,
                                evaluate=False)
    report = InterpReport(str(tmp_path / "report"))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune, report], max_epochs=1, enable_checkpointing=False)
    module = UserModule(tiny_net())
    trainer.fit(module, *loaders())
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert saved["model_attr"] == "net" and saved["summary"]["channels"]["0"] == [8, 4]
    assert {1, 2} <= set(saved["summary"]["pruned"]["0"]) and len(saved["summary"]["rounded"]["0"]) == 2
    rebuilt, _ = load_pruned(tmp_path / "pruned.pt", UserModule(tiny_net()))  # the whole module: `net` rebuilt
    assert rebuilt.net[0].out_channels == 4 and rebuilt.net[3].in_channels == 4
    assert "2 of them were not flagged" in open(report.path).read() and "multiple of 4 channels" in open(report.path).read()


def test_prune_then_fine_tune_on_the_samples_not_flagged(tmp_path):
    prune = PruneFlaggedFilters({"net.2": [1, 2]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"),
                                finetune_epochs=2, finetune_exclude=lambda: torch.tensor([0, 5]), finetune_lr=1e-2,
                                strict=True)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    module = UserModule(tiny_net())
    trainer.fit(module, *loaders())
    rebuilt, summary = load_pruned(str(tmp_path / "pruned.pt"), UserModule(tiny_net()))
    net = rebuilt.net
    assert summary["finetune_epochs"] == 2 and summary["finetune_samples"] == 14  # 16 training samples, 2 flagged
    assert summary["channels"]["0"] == [8, 6] and "val_acc_pruned" in summary
    # What was saved is the fine-tuned network: not the trained one with the two filters cut out.
    kept = [i for i in range(8) if i not in (1, 2)]
    assert not torch.equal(net[0].weight, module.net[0].weight[kept].cpu())
    with pytest.raises(ValueError, match="`finetune_epochs` to be a non-negative int but got -1"):
        PruneFlaggedFilters({"net.2": [1]}, finetune_epochs=-1)
    with pytest.raises(TypeError, match="`finetune_exclude` to be indices .* but got str"):
        PruneFlaggedFilters({"net.2": [1]}, finetune_epochs=1, finetune_exclude="flagged.json")
