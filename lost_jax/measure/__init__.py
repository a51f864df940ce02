"""Measuring: closed-form counts (accounting), compiled programs (compiled, step_memory),
FLOPs and MFU (flops), and step timing (timing)."""
