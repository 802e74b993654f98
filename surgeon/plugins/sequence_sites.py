"""Site finders for sequence models: rnn, tokens, rnn_input."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_site_finders(register):
    from surgeon.surgery import sequence

    register("rnn", sequence.find_rnn, summary="replaces the last-step / h_n / mean selection of an RNN's output")
    register("tokens", sequence.find_tokens, summary="a (B, N, C) sequence: after a transformer block, or "
             "an RNN output used per step")
    register("rnn_input", sequence.find_rnn_input, summary="the input sequence of an RNN")
