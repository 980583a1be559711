"""Decisions taken on calibration data: weight quantization (RTN, GPTQ, rotation), QUOTA's weights and schedule, KV scales."""
