"""What each training script adds to the shared loop: the expert, the generator (L1 + frozen expert's
sync loss), + a visual-quality discriminator (BCE GAN), + a Wasserstein critic with gradient penalty."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lipsync.train.checkpoints import load_training_checkpoint, unwrap
from lipsync.train.data import GeneratorDataset, SyncDataset
from lipsync.train.training import Trainer
from models import build_disc, build_expert, build_generator, cosine_sync_probability, load_model

log = logging.getLogger("train")


def sync_bce(audio_emb, face_emb, y):
    """The expert's loss: BCE of the (clamped) cosine similarity against in-sync labels."""
    p = cosine_sync_probability(audio_emb.float(), face_emb.float()).unsqueeze(1)
    return F.binary_cross_entropy(p, y), p


def lower_half_stack(g: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, S, S) faces -> (B, 3T, S/2, S) lower halves stacked on channels, the expert's input."""
    g = g[:, :, :, g.size(3) // 2:]
    return torch.cat([g[:, :, i] for i in range(g.size(2))], dim=1)


# ------------------------------------------------------------------------------------------------
class ExpertTrainer(Trainer):
    script = "color_syncnet_train.py"
    prefix = ""
    dataset_cls = SyncDataset
    batch_size_key = "syncnet_batch_size"
    lr_key = "syncnet_lr"
    eval_interval_key = "syncnet_eval_interval"
    checkpoint_interval_key = "syncnet_checkpoint_interval"

    def setup(self):
        self.best_metric = self.hp.syncnet_best_metric
        self.best_is_highest = self.best_metric == "auc"
        self.best = self.worst_score()
        self.model = build_expert(self.hp).to(self.device)
        if self.hp.syncnet_weight_decay > 0:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.hp.syncnet_lr,
                                         weight_decay=self.hp.syncnet_weight_decay)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=self.hp.syncnet_lr)
        if self.args.checkpoint_path:
            self.restore_counters(load_training_checkpoint(self.args.checkpoint_path, self.model, self.opt))
            log.info("resumed the expert from %s at step %d", self.args.checkpoint_path, self.global_step)
        self.net = self.env.wrap(self.model)

    def models(self):
        return [self.net]

    def train_step(self, batch):
        x, mel, y = batch
        with self.autocast():
            a, v = self.net(mel, x)
        loss, _ = sync_bce(a, v, y)
        self.backward(loss, self.opt)
        return {"loss": loss.item()}

    def eval_step(self, batch):
        x, mel, y = batch
        a, v = self.net(mel, x)
        loss, p = sync_bce(a, v, y)
        accuracy = ((p > 0.5).float() == y).float().mean()
        self._scored.append((p.reshape(-1).cpu(), y.reshape(-1).cpu()))
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def evaluate(self, writer=None):
        """The shared means (loss, accuracy) plus ``auc``: the ROC AUC of every validation pair scored
        (in sync vs >= 5 frames off; with DDP, the mean of each process's AUC)."""
        from lipsync.eval.metrics import roc_auc

        self._scored = []
        metrics = super().evaluate(writer)
        p, y = (torch.cat(parts).numpy() for parts in zip(*self._scored))  # (pairs,), (pairs,)
        metrics["auc"] = self.env.mean(roc_auc(p, y))
        return metrics

    def checkpoint_payload(self):
        return {self.prefix: {"state_dict": self.model.state_dict(), "optimizer": self.opt.state_dict()}}


# ------------------------------------------------------------------------------------------------
class GeneratorTrainer(Trainer):
    script = "wav2lip_train.py"
    prefix = "wav2lip_"
    dataset_cls = GeneratorDataset
    adam_betas = (0.9, 0.999)

    def setup(self):
        self.gen = build_generator(self.hp).to(self.device)
        self.opt = torch.optim.Adam(self.gen.parameters(), lr=self.hp.initial_learning_rate, betas=self.adam_betas)
        self.extra_state = {"syncnet_wt": float(self.hp.syncnet_wt)}
        expert = load_model(self.args.syncnet_checkpoint_path, kind="expert", img_size=self.hp.img_size)
        self.expert = expert.model.to(self.device).eval()
        for p in self.expert.parameters():
            p.requires_grad_(False)
        if self.args.checkpoint_path:
            self.restore_counters(load_training_checkpoint(self.args.checkpoint_path, self.gen, self.opt))
            log.info("resumed the generator from %s at step %d (sync weight %g)", self.args.checkpoint_path,
                     self.global_step, self.extra_state["syncnet_wt"])
        self.net = self.env.wrap(self.gen)

    def models(self):
        return [self.net]

    @property
    def sync_wt(self) -> float:
        return float(self.extra_state["syncnet_wt"])

    def target_sync_wt(self) -> float:
        return self.hp.syncnet_wt_l1

    def sync_loss(self, mel, g):
        a, v = self.expert(mel, lower_half_stack(g))
        return sync_bce(a, v, torch.ones(len(g), 1, device=g.device))[0]

    def generate(self, batch):
        x, indiv, mel, gt = batch
        with self.autocast():
            g = self.net(indiv, x)
        return g.float(), mel, gt

    def generator_losses(self, g, mel, gt):
        l1 = F.l1_loss(g, gt)
        sync = self.sync_loss(mel, g) if self.sync_wt > 0 else torch.zeros((), device=g.device)
        return l1, sync

    def train_step(self, batch):
        g, mel, gt = self.generate(batch)
        l1, sync = self.generator_losses(g, mel, gt)
        loss = self.sync_wt * sync + (1 - self.sync_wt) * l1
        self.backward(loss, self.opt)
        return {"l1": l1.item(), "sync": sync.item()}

    def eval_step(self, batch):
        g, mel, gt = self.generate(batch)
        l1 = F.l1_loss(g, gt)
        sync = self.sync_loss(mel, g)
        w = self.target_sync_wt()
        return {"l1": l1.item(), "sync": sync.item(), "loss": (1 - w) * l1.item() + w * sync.item()}

    def after_eval(self, metrics):
        # the published schedule: sync loss off until the generator's eval sync loss is low enough
        if self.sync_wt == 0 and metrics["sync"] < self.hp.syncnet_wt_threshold:
            self.extra_state["syncnet_wt"] = self.target_sync_wt()
            log.info("eval sync loss %.3f < %.2f: sync-loss weight -> %g", metrics["sync"],
                     self.hp.syncnet_wt_threshold, self.sync_wt)

    def log_images(self, writer, batch):
        import torchvision

        x, indiv, mel, gt = batch
        g, _, _ = self.generate(batch)
        k = min(4, len(x))
        rows = [x[:k, 3:, 0], x[:k, :3, 0], g[:k, :, 0], gt[:k, :, 0]]  # reference, masked, generated, truth
        grid = torchvision.utils.make_grid(torch.cat(rows).flip(1).clamp(0, 1), nrow=k)  # BGR -> RGB
        writer.add_image("val/reference_masked_generated_truth", grid, self.global_step)

    def checkpoint_payload(self):
        return {self.prefix: {"state_dict": self.gen.state_dict(), "optimizer": self.opt.state_dict()}}


# ------------------------------------------------------------------------------------------------
class GANTrainer(GeneratorTrainer):
    """+ the visual-quality discriminator, trained with BCE on real vs. generated lower halves."""

    script = "hq_wav2lip_train.py"

    adam_betas = (0.5, 0.999)

    def setup(self):
        super().setup()
        self.disc = build_disc(self.hp).to(self.device)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.hp.disc_initial_learning_rate,
                                         betas=(0.5, 0.999))
        if getattr(self.args, "disc_checkpoint_path", None):
            load_training_checkpoint(self.args.disc_checkpoint_path, self.disc, self.disc_opt)
            log.info("resumed the discriminator from %s", self.args.disc_checkpoint_path)
        self.disc_net = self.env.wrap(self.disc)

    def models(self):
        return [self.net, self.disc_net]

    def optimizers(self):
        return super().optimizers() + [(self.disc_opt, self.hp.disc_initial_learning_rate)]

    def target_sync_wt(self) -> float:
        return self.hp.syncnet_wt_gan

    def adversarial_loss(self, g):
        """Generator side: BCE of the discriminator's verdict on generated faces against 'real'."""
        return unwrap(self.disc).perceptual_forward(g)

    def disc_loss(self, gt, g):
        B = len(gt)
        pred = self.disc_net(torch.cat([gt, g.detach()]))  # one forward: rows are frame-major (t * 2B + b)
        pred = pred.view(-1, 2 * B)
        real, fake = pred[:, :B], pred[:, B:]
        real_loss = F.binary_cross_entropy(real, torch.ones_like(real))
        fake_loss = F.binary_cross_entropy(fake, torch.zeros_like(fake))
        return real_loss + fake_loss, {"disc_real": real_loss.item(), "disc_fake": fake_loss.item()}

    def train_step(self, batch):
        g, mel, gt = self.generate(batch)
        l1, sync = self.generator_losses(g, mel, gt)
        self.disc.requires_grad_(False)  # the generator's step does not touch the discriminator
        adv = self.adversarial_loss(g) if self.hp.disc_wt > 0 else torch.zeros((), device=g.device)
        self.disc.requires_grad_(True)
        loss = self.sync_wt * sync + self.hp.disc_wt * adv + (1 - self.sync_wt - self.hp.disc_wt) * l1
        self.backward(loss, self.opt)
        d_loss, d_parts = self.disc_loss(gt, g)
        self.backward(d_loss, self.disc_opt)
        return {"l1": l1.item(), "sync": sync.item(), "adv": adv.item(), **d_parts}

    def eval_step(self, batch):
        out = super().eval_step(batch)
        g, _, gt = self.generate(batch)
        out["adv"] = self.adversarial_loss(g).item()
        _, d_parts = self.disc_loss(gt, g)
        out.update(d_parts)
        return out

    def checkpoint_payload(self):
        out = super().checkpoint_payload()
        out["disc_"] = {"state_dict": self.disc.state_dict(), "optimizer": self.disc_opt.state_dict()}
        return out


class WGANTrainer(GANTrainer):
    """+ a Wasserstein critic (the discriminator's pre-sigmoid score) with gradient penalty."""

    script = "wloss_hq_wav2lip_train.py"

    def adversarial_loss(self, g):
        return -unwrap(self.disc).logits(g).mean()

    def disc_loss(self, gt, g):
        B = len(gt)
        fake = g.detach()
        eps = torch.rand(B, 1, 1, 1, 1, device=gt.device)
        interp = (eps * gt + (1 - eps) * fake).requires_grad_(True)
        out = self.disc_net(torch.cat([gt, fake, interp]), logits=True).view(-1, 3 * B)  # one forward for all
        real, fake_s, mid = out[:, :B], out[:, B:2 * B], out[:, 2 * B:]
        if torch.is_grad_enabled():
            grad, = torch.autograd.grad(mid.sum(), interp, create_graph=True)
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        else:  # evaluation: the penalty needs gradients and is not a quality measure
            gp = torch.zeros((), device=gt.device)
        w_dist = real.mean() - fake_s.mean()
        loss = -w_dist + self.hp.wgan_gp_weight * gp
        return loss, {"critic_w": w_dist.item(), "gp": gp.item()}
