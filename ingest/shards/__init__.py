"""Everything one worker owns: partitions, logs, segments, indexes, batch codec, kernels."""
