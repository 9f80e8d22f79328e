"""Offline work beside the decoding path: training the built-in models and the Learn2PD filter, fitting AdaDec's
thresholds, generating the waiting-line data and evaluating decoders on ParallelBench. Nothing on the decoding path
imports this package."""
