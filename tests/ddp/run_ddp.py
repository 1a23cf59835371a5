"""Run every exported callback under DDP (2 CPU processes, gloo) and dump what each rank saw;
used by tests/test_ddp.py.

    python tests/ddp/run_ddp.py OUT_DIR [DEVICES]

Ranks see different validation data: ``use_distributed_sampler=False`` and the validation loader
holds 40 samples on rank 0 (3 batches) and 24 on rank 1 (2 batches), so one rank runs a batch
fewer and the ranks' validation metrics differ (they are logged without ``sync_dist``). The
training loader is sharded by hand with a ``DistributedSampler`` (even counts: DDP's gradient
all-reduce needs the same number of steps on every rank). The learning-image monitor draws its
probe from the validation split, which differs between ranks, and asks for more samples than
rank 1 has: the probe, the anomaly flags, the WT epoch and the masks are decided on rank 0.

Each rank writes its stdout and stderr to ``OUT_DIR/rank<r>.log`` (the launcher's own output, before rank 1
exists, goes to rank 0's), one ``heartbeat`` line per training and validation batch, and dumps the stacks of
all its threads there on ``SIGUSR1``: the test reads the logs to tell a slow run from a stuck one and shows
them when a run fails.
"""

import faulthandler
import json
import os
import signal
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from callback_factories import make_callbacks  # noqa: E402

from lightning_interp.callbacks import (  # noqa: E402
    AnomalyFilterMonitor,
    FeatureQuantityMonitor,
    FilterMasking,
    LearningImageLogger,
    MemorisationScorer,
    SampleDynamicsMonitor,
    TIPMonitor,
)
from lightning_interp.data import ShapesDataModule, with_index  # noqa: E402
from lightning_interp.models import ImageClassifier, SimpleCNN  # noqa: E402
from lightning_interp.overfitting import AlarmRule  # noqa: E402
from lightning_interp.scores import Selection  # noqa: E402

VAL_PER_RANK = (40, 24)


class RankDependentData(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.shapes = ShapesDataModule(num_train=96, num_val=40, num_test=8, batch_size=16, image_size=16)

    def setup(self, stage=None):
        self.shapes.setup(stage)

    def train_dataloader(self):
        # Items carry their dataset index, for SampleDynamicsMonitor(source="batches").
        data = with_index(self.shapes.train_set)
        if self.trainer.world_size > 1:
            sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                         shuffle=True, seed=0)
            return DataLoader(data, batch_size=16, sampler=sampler)
        return DataLoader(data, batch_size=16, shuffle=True)

    def val_dataloader(self):
        n = VAL_PER_RANK[self.trainer.global_rank % len(VAL_PER_RANK)]
        return DataLoader(Subset(self.shapes.val_set, range(n)), batch_size=16)


def _plain(state: dict) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class Heartbeat(pl.Callback):
    """A line per batch: progress the test's watchdog sees (a rank stuck in a collective writes none)."""

    def _beat(self, trainer, what, batch_idx):
        print(f"{time.strftime('%H:%M:%S')} heartbeat rank {trainer.global_rank} epoch {trainer.current_epoch} "
              f"{what} batch {batch_idx}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._beat(trainer, "train", batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._beat(trainer, "val", batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):  # after the monitors' epoch-end scans (placed last)
        self._beat(trainer, "epoch end", -1)


class RankDependentLoss(pl.Callback):
    """Logs ``ddp/rising`` at validation end, without ``sync_dist``: the epoch on rank 0 (a loss that rises from
    epoch 1, so the alarm fires there), minus the epoch on rank 1 (an alarm of its own would never fire): the
    alarm and the masks it starts must be rank 0's on every rank."""

    def on_validation_epoch_end(self, trainer, pl_module):
        sign = 1.0 if trainer.global_rank == 0 else -1.0
        pl_module.log("ddp/rising", sign * trainer.current_epoch, on_step=False, on_epoch=True)


def log_to_file(out: str) -> None:
    """Send this process' stdout/stderr (file descriptors 1 and 2, so C++ and child output too) to
    ``out/rank<LOCAL_RANK>.log``; dump every thread's stack there on SIGUSR1."""
    os.makedirs(out, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    log = open(os.path.join(out, f"rank{rank}.log"), "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    print(f"{time.strftime('%H:%M:%S')} rank {rank} pid {os.getpid()} argv {sys.argv} "
          f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}", flush=True)


def main(out: str, devices: int) -> None:
    log_to_file(out)
    pl.seed_everything(0)
    torch.set_num_threads(1)
    data = RankDependentData()
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), lr=3e-3)
    # Loose criteria (alpha = beta = theta = 0) so that filters are flagged and masked.
    made = make_callbacks({
        AnomalyFilterMonitor: {"probe_size": 48, "alpha": 0.0, "beta": 0.0, "theta": 0.0},
        LearningImageLogger: {"probe_split": "val", "probe_size": 32},
        FilterMasking: {"start_epoch": 1},
    })
    # The factory's monitor reads an eval pass over its tracked subset; this one the training batches, which
    # DistributedSampler splits between the ranks: each rank sees half the samples and the epoch's observations
    # are summed across ranks.
    # Its validation-loss alarm (on rank 0's rising key, patience 1: it fires at epoch 1) starts a second
    # masking, by the memorisation score of its 8 most suspect samples, from epoch 2.
    batches = SampleDynamicsMonitor(source="batches", log_prefix="interp_batches", num_images=2, flag_rule=8,
                                    alarm=AlarmRule("val_loss", patience=1, rel=0.0, margin=0.0, min_epoch=0),
                                    val_loss_key="ddp/rising")
    scorer = MemorisationScorer(batches, module, ["model.relu3"], fitted_only=False)
    live = FilterMasking(scorer, select=Selection("taylor", amount=0.25), start_on=batches.alarm_key,
                         name="live")
    callbacks = [RankDependentLoss(), *made.values(), batches, live, Heartbeat()]
    trainer = pl.Trainer(
        strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_epochs=3,
        default_root_dir=out, logger=pl.loggers.CSVLogger(out, name="csv"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    anomaly, masking = made[AnomalyFilterMonitor], made[FilterMasking]
    result = {
        "rank": trainer.global_rank,
        "val_batches": trainer.num_val_batches,
        "anomaly_history": anomaly.history,
        "flagged": anomaly.flagged,
        "val_history": anomaly.val_history,
        "wt_epoch": anomaly.wt_epoch,
        "probe": anomaly.probe.x.double().sum().item(),
        "probe_indices": anomaly.probe_indices,
        "val_probe": made[LearningImageLogger].probe.x.double().sum().item(),
        "val_probe_indices": made[LearningImageLogger].probe_indices,
        "tip_history": made[TIPMonitor].history,
        "masking": masking.history,
        "masks_in_force": masking.in_force,
        "lil_history": made[LearningImageLogger].history,
        "fq_history": made[FeatureQuantityMonitor].history,
        "callbacks": sorted(cls.__name__ for cls in made),
        "dynamics_subset": _plain(made[SampleDynamicsMonitor].dynamics.state_dict()),
        "dynamics_batches": _plain(batches.dynamics.state_dict()),
        "dynamics_history": [made[SampleDynamicsMonitor].history, batches.history],
        "alarm_epochs": [batches.alarm_epoch, live.alarm_epoch],
        "live_masking": live.history,
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
