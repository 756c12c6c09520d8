use ffwd::core::gemm::{matmul, use_gemm_crate, MatMut, MatRef};
use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).take(3).map(|v| v.parse().unwrap()).collect();
    let ta = std::env::args().any(|a| a == "ta");
    let (m, k, n) = (args[0], args[1], args[2]);
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let av = if ta { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
    let bv = MatRef::new(&b, k, n);
    let flops = 2.0 * (m * n * k) as f64;
    for crate_on in [false, true, false, true] {
        use_gemm_crate(crate_on);
        let mut ts = vec![];
        for _ in 0..20 {
            let t = Instant::now();
            matmul(MatMut::new(&mut c, m, n), av, bv, false);
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|x, y| x.total_cmp(y));
        println!("{} {:.1} GFLOP/s", if crate_on { "crate" } else { "own  " }, flops / ts[10] / 1e9);
    }
}
