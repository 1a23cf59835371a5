"""lightning_interp.callbacks.prune: PruneFlaggedFilters on a user's module fed plain dataloaders."""

from conftest import make_trainer
from test_user_models import UserModule, loaders, tiny_net

from lightning_interp.callbacks import PruneFlaggedFilters, load_pruned


def test_prune_evaluates_on_the_dataloaders_given_to_fit(tmp_path):
    prune = PruneFlaggedFilters({"net.2": [1, 2]}, model_attr="net", out_path=str(tmp_path / "pruned.pt"))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())  # no datamodule: the validation loader given to fit
    net, summary = load_pruned(tmp_path / "pruned.pt", tiny_net())
    assert summary["channels"]["0"] == [8, 6]
    assert 0.0 <= summary["val_acc_before"] <= 1.0 and 0.0 <= summary["val_acc_after"] <= 1.0
