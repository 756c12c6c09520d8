//! Learning-rate schedule: linear warmup then cosine decay to a floor.

/// `lr(step)`: linear warmup from 0 over `warmup` steps, then cosine from `peak` down to
/// `peak · min_ratio` at `total` steps.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
    /// Final LR as a fraction of the peak.
    pub min_ratio: f32,
}

impl Schedule {
    /// Learning rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = Schedule { peak: 1.0, warmup: 10, total: 110, min_ratio: 0.1 };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-5);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
    }
}
