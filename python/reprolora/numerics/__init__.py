"""float32 operations whose every element has one answer, defined by mathematics (the `reference` profile).

A float32 product, sum or exponential computed by a BLAS, an ISA's vector unit or a libm has no single answer:
each rounds its own way. Every operation here is defined as the float32 nearest to an exact real number (ties to
even), or as a written-out sequence of such operations and single IEEE-754 operations (add, subtract, multiply,
divide, square root), each its own tensor op. Their results depend on the inputs alone: not on the CPU, the
architecture, the BLAS, the torch version or the thread count.

Modules:
- exact:       the rounding test on a float64 value with a proven bound, the compensated and exact fallback sums,
               rounding an exact rational to float32 (the definition every answer comes from).
- matmul:      the correctly rounded float32 matrix product (float64 product, bound, fallback).
- reductions:  the correctly rounded float32 sum along a dimension.
- pointwise:   correctly rounded exp, log, sqrt (float64 route, rounding test, mpmath fallback); sigmoid, silu,
               the rotary tables.
- random:      counter-based random numbers (Philox4x32-10 in int64 tensor ops, keys from SHA-256 of the key
               tuple): LoRA's A and dropout masks, exact from the bits, keyed by what they belong to.
- optim:       AdamW as written-out float32 IEEE operations with scalars each rounded once from exact rationals;
               the learning-rate schedule as the float64 nearest its exact value.
"""
