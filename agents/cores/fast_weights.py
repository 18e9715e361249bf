"""Fast-weight recurrences as functions (DESIGN §3): per-step references and fast paths."""

from agents.cores.recurrent_fast_weights import delta_lstm, delta_rnn, rdn

__all__ = ["delta_lstm", "delta_rnn", "rdn"]
