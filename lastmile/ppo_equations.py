"""The PPO equations of paper §3.3 (Eq. 1-4) and the length penalty of §3.2, as pure
tensor functions over output-token space: [B, T] tensors, T = the longest output of the
batch, with a [B, T] mask of each row's tokens. ppo_trainer.py feeds them; tests check
them on hand-computed tensors.

Equations (T = output length of the row, V(s_T) = 0 beyond the last token):
  Eq. 1  w_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
  Eq. 2  A_t = sum_{t'=t}^{T-1} (γλ)^{t'-t} (r_{t'+1} + γ V(s_{t'+1}) - V(s_{t'}))      (`gae`)
  Eq. 3  L_PPO = E_t[min(w_t A_t, clip(w_t, 1-ε, 1+ε) A_t)], maximised      (`policy_loss`)
  Eq. 4  V(s_t)^target = sum_{t'=t}^{T-1} γ^{t'-t} r_{t'+1}, a Monte-Carlo return (not GAE's
         A + V, as the paper writes it); squared loss                  (`value_loss`)
E_t is a mean over every output token of the batch. No entropy or KL term by default.
"""

from __future__ import annotations

import torch

from . import distributed


def length_penalty(output_lengths: torch.Tensor, reference_lengths: torch.Tensor, T: int,
                   coef: float = -2.5) -> torch.Tensor:
    """[B, T]: `coef` on every output token past the reference length, 0 elsewhere (§3.2).

    output_lengths, reference_lengths [B] count tokens the same way (EOS included when the
    output ended); token t (0-based) is penalised when reference_length <= t < output_length.
    """
    t = torch.arange(T, device=output_lengths.device)  # [T]
    beyond = (t[None, :] >= reference_lengths[:, None]) & (t[None, :] < output_lengths[:, None])
    return torch.where(beyond, coef, 0.0)  # [B, T] float32


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 4: G_t = sum_{t'>=t} γ^{t'-t} r_{t'+1} over the row's tokens; [B, T] -> [B, T]."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask  # zero past each row's end, so the sum stops there
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]; V(s_T)^target = 0 past the last token
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 advantages and Eq. 4 value targets; all [B, T], token t of row b at [b, t].

    rewards[b, t] is r_{t+1} (the reward for a_t), values[b, t] is V(s_t), mask[b, t] is True
    for the row's output tokens (a prefix of each row). V(s_T) = 0 beyond the last token.
    Nothing here is differentiated: pass detached values.
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask  # both zero past each row's end: V(s_T) = 0 there, and the
    values = values * mask  # TD errors (and so the sums) stop at the last token
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B] A_{t+1}
    next_value = torch.zeros_like(running)  # [B] V(s_{t+1})
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages * mask, discounted_returns(rewards, mask, gamma)


def last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: each row's entry at its last output token (0 for a row with none).

    The last action ends the row (its EOS, or the budget's last token); its advantage is
    r_T - V(s_{T-1}) under Eq. 2, since V = 0 beyond it: a value head that expects more
    reward than the ending brings makes stopping look bad.
    """
    last = (mask.sum(dim=1) - 1).clamp(min=0)  # [B]
    picked = x.gather(1, last[:, None]).squeeze(1)  # [B]
    return torch.where(mask.any(dim=1), picked, torch.zeros_like(picked))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def batch_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean` over the whole outer batch: this rank's rows and every other rank's
    (numerator and denominator summed over ranks; `masked_mean` itself in one process)."""
    mask = mask.to(x.dtype)
    total = distributed.all_reduce_sum((x * mask).sum())
    return total / distributed.all_reduce_sum(mask.sum()).clamp(min=1.0)


def batch_masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (population) variance of the masked entries of the whole outer batch."""
    return batch_masked_mean((x - batch_masked_mean(x, mask)) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries of the whole outer batch (optional
    advantage whitening; statistics over every rank's rows)."""
    mean = batch_masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(batch_masked_var(x, mask) + eps) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(G - V) / Var(G) over the masked tokens of the whole outer batch: how much of
    the Eq. 4 returns' spread the value head predicts. 1 is a perfect V, 0 one no better than
    the batch's mean return, below 0 worse than that; NaN when the returns do not vary. Near
    0, Eq. 2's advantages are the rewards-to-go themselves, with no baseline.
    """
    returns_var = batch_masked_var(returns, mask)
    if float(returns_var) == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - batch_masked_var(returns - values, mask) / returns_var


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 + 3 as a loss to minimise: -E_t[min(w_t A_t, clip(w_t, 1±ε) A_t)].

    Returns (loss, clip_fraction, approx_kl): the share of tokens whose clipped term is the
    active one (zero gradient), and 0.5·E_t[(log w_t)^2] (a KL(old‖new) estimate). Any
    shape; E_t is the masked mean over all entries.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # Eq. 1
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # Eq. 3, negated
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared loss against the Eq. 4 targets, mean over the masked tokens."""
    return masked_mean((values - targets) ** 2, mask)
