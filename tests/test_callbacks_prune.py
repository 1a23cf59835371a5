"""lightning_interp.callbacks.prune: PruneFlaggedFilters on a user's module fed plain dataloaders; round_to; the
saved file loads without pickle into the user's module; with and without a fine-tune on the samples not flagged."""

import pytest
import torch
from conftest import make_trainer
from test_aipc import one_filter_per_class
from test_user_models import UserModule, loaders, tiny_net
from torch.utils.data import DataLoader, TensorDataset

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


class Frozen(UserModule):
    """Trains with a zero learning rate: the network the test built is the one pruned."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_prune_reports_the_accuracy_the_pruned_network_has(tmp_path):
    # Filter k of net.0 carries class k alone (test_aipc.one_filter_per_class): all 10 validation samples
    # are right before pruning; without filter 1, its 2 samples fall to the reject class: 8 of 10.
    net, batches = one_filter_per_class()
    data = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    prune = PruneFlaggedFilters({"net.0": [1]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    trainer.fit(Frozen(net), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    rebuilt, summary = load_pruned(str(tmp_path / "pruned.pt"), Frozen(one_filter_per_class()[0]))
    pruned = rebuilt.net
    assert summary["channels"]["0"] == [4, 3]
    assert summary["val_acc_before"] == pytest.approx(1.0) and summary["val_acc_after"] == pytest.approx(0.8)
    assert prune.summary["val_acc_after"] == summary["val_acc_after"]
    # The saved network itself: class 1's samples are now rejected (logit 4), everything else is right.
    with torch.no_grad():
        pred = pruned.eval()(data.tensors[0]).argmax(1)
    assert pred.tolist() == [0, 4, 4, 2, 2, 2, 3, 3, 3, 3]
