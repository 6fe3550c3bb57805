"""The metrics: FID with named feature extractors, control fidelity with the sudden-convergence tracker, and the
papers' sampling protocols for evaluation."""
