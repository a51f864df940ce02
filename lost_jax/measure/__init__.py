"""Measurements of a recipe's real step: memory and collectives of the compiled program
(compiled, step_memory), FLOPs and MFU (flops), and interleaved step timing (timing)."""
