"""Pure-PyTorch reference of every op: slow, obviously right, float64-capable, any device.
Tests and benchmarks compare against these; they are also the fallback of last resort."""
