"""Benchmarks: peak training memory and step time (memory_speed), and the accuracy suite."""
