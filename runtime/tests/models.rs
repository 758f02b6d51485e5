//! BERT and ResNet-50 (small configurations of the real architectures) give the same outputs on
//! 1, 2 and 3 in-process workers (pipeline stages, real TCP between them) as on one.

mod common;
use candle_core::{Device, Tensor};
use common::bits;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::builders::{bert, resnet, BertConfig, ResNetConfig};
use genie_scheduler::graph::Graph;
use std::sync::Arc;

fn across_workers(driver: &mut Driver, g: &Graph, inputs: &[(&str, Tensor)]) {
    let mut reference: Option<Vec<Vec<u32>>> = None;
    for n in [1usize, 2, 3] {
        let p = Placement::contiguous(g, n).unwrap();
        assert_eq!(p.workers(), n);
        let out = driver.run(g, &p, inputs, &g.outputs, 0).unwrap();
        assert_eq!(out.counters.transfers > 0, n > 1, "{n} workers");
        let got: Vec<Vec<u32>> = out.outputs.iter().map(bits).collect();
        for o in &out.outputs {
            let v: Vec<f32> = o.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "non-finite output");
        }
        match &reference {
            None => reference = Some(got),
            Some(r) => assert!(r == &got, "{} differs on {n} workers", g.name),
        }
    }
}

#[test]
fn bert_and_resnet_match_single_worker() {
    let cluster = EmbeddedCluster::start(3, Arc::new(CpuKernels::new())).unwrap();
    let mut driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(7)).unwrap();

    let bc = BertConfig {
        layers: 2,
        hidden: 64,
        heads: 2,
        intermediate: 128,
        vocab: 100,
        max_positions: 32,
        type_vocab: 2,
        batch: 2,
        seq_len: 8,
        ..BertConfig::default()
    };
    let g = bert(&bc).unwrap();
    let ids: Vec<i64> = (0..16).map(|i| (i * 13 + 5) % 100).collect();
    let types: Vec<i64> = (0..16).map(|i| i64::from(i % 8 >= 4)).collect();
    let pos: Vec<i64> = (0..16).map(|i| i % 8).collect();
    let dev = &Device::Cpu;
    let inputs = [
        ("input_ids", Tensor::from_vec(ids, (2, 8), dev).unwrap()),
        (
            "token_type_ids",
            Tensor::from_vec(types, (2, 8), dev).unwrap(),
        ),
        ("position_ids", Tensor::from_vec(pos, (2, 8), dev).unwrap()),
    ];
    across_workers(&mut driver, &g, &inputs);

    let rc = ResNetConfig {
        blocks: [1, 1, 1, 1],
        width: 8,
        classes: 10,
        batch: 1,
        image: 32,
        ..ResNetConfig::default()
    };
    let g = resnet(&rc).unwrap();
    let px: Vec<f32> = (0..3 * 32 * 32)
        .map(|i| ((i % 97) as f32) / 97.0 - 0.5)
        .collect();
    let inputs = [("images", Tensor::from_vec(px, (1, 3, 32, 32), dev).unwrap())];
    across_workers(&mut driver, &g, &inputs);
    cluster.stop(driver).unwrap();
}
