"""lightning_interp.callbacks.prune: PruneFlaggedFilters on a user's module fed plain dataloaders."""

import pytest
import torch
from conftest import make_trainer
from test_aipc import one_filter_per_class
from test_user_models import UserModule, loaders, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import PruneFlaggedFilters, load_pruned


def test_prune_evaluates_on_the_dataloaders_given_to_fit(tmp_path):
    prune = PruneFlaggedFilters({"net.2": [1, 2]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())  # no datamodule: the validation loader given to fit
    net, summary = load_pruned(str(tmp_path / "pruned.pt"))
    assert summary["channels"]["0"] == [8, 6]
    assert 0.0 <= summary["val_acc_before"] <= 1.0 and 0.0 <= summary["val_acc_after"] <= 1.0


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
    pruned, summary = load_pruned(str(tmp_path / "pruned.pt"))
    assert summary["channels"]["0"] == [4, 3]
    assert summary["val_acc_before"] == pytest.approx(1.0) and summary["val_acc_after"] == pytest.approx(0.8)
    assert prune.summary["val_acc_after"] == summary["val_acc_after"]
    # The saved network itself: class 1's samples are now rejected (logit 4), everything else is right.
    with torch.no_grad():
        pred = pruned.eval()(data.tensors[0]).argmax(1)
    assert pred.tolist() == [0, 4, 4, 2, 2, 2, 3, 3, 3, 3]
