//! Helpers shared by the runtime's integration tests.

/// A tensor's f32 values as bit patterns, for bitwise comparisons between runs.
pub fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}
