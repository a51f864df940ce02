"""Pure numerics, no modules: custom-VJP matmuls, attention kernels, the fused loss, top-k
selection and 8-bit / NF4 quantisation."""
