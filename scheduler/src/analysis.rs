//! Graph analysis: workload class, patterns, and the annotations a frontend left out.
//!
//! [`analyze`] reads a graph and returns an [`Analysis`]: the workload class, the attention
//! blocks, convolution stages, KV-cache reads/appends and fusable chains it found, and for every
//! node the *effective* phase, residency, co-location group and fusion group — the frontend's
//! annotation where there is one, else one inferred here:
//!
//! - residency from the op ([`Node::residency`]);
//! - phase: convolutions, pools and batch norms are vision, embeddings are embedding, KV-cache ops
//!   and attention over a cache are decode; any other node inherits its producers' phase, and
//!   nodes with no annotated ancestor get the workload's main phase;
//! - co-location: a KV cache, the append that extends it, the reads of the result and the
//!   attention that consumes them form the group `kv.<cache node id>` (the cache never moves);
//! - fusion: a chain `linear|matmul|conv2d → (batch_norm | elementwise)*`, where each link is the
//!   sole consumer of its single-consumer producer, forms the group `fuse.<head node id>`.
//!
//! [`annotate`] writes the inferred annotations back into the graph.

use crate::graph::{Consumers, Graph, Node, NodeId, OpKind, Phase, Residency};
use serde::{Deserialize, Serialize};

/// What kind of model a graph is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadClass {
    /// Attention / embeddings / KV caches without convolutions.
    Llm,
    /// Convolutions without attention.
    Vision,
    /// Both.
    Multimodal,
    /// Neither.
    Other,
}

/// An attention operation and the KV cache it reads, if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionBlock {
    /// The attention node (fused, or the softmax of an unfused QKᵀ/softmax/AV chain).
    pub attention: NodeId,
    /// The KV-cache state node it reads, through an append and reads.
    pub kv_cache: Option<NodeId>,
}

/// Consecutive convolutions producing the same spatial size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvStage {
    /// Output height and width of the stage.
    pub spatial: [usize; 2],
    /// Its convolutions, in id order.
    pub convs: Vec<NodeId>,
}

/// Result of [`analyze`]. Per-node vectors are indexed by [`NodeId`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// Workload class.
    pub workload: WorkloadClass,
    /// Attention operations.
    pub attention_blocks: Vec<AttentionBlock>,
    /// Convolution stages.
    pub conv_stages: Vec<ConvStage>,
    /// KV-cache state nodes.
    pub kv_caches: Vec<NodeId>,
    /// KV-cache reads.
    pub kv_reads: Vec<NodeId>,
    /// KV-cache appends.
    pub kv_appends: Vec<NodeId>,
    /// Fusable chains (head first).
    pub fusable_chains: Vec<Vec<NodeId>>,
    /// Effective phase of every node.
    pub phase: Vec<Phase>,
    /// Effective residency of every node.
    pub residency: Vec<Residency>,
    /// Effective co-location group of every node.
    pub colocation: Vec<Option<String>>,
    /// Effective fusion group of every node.
    pub fusion: Vec<Option<String>>,
}

fn intrinsic_phase(node: &Node) -> Option<Phase> {
    match node.op {
        OpKind::Conv2d { .. }
        | OpKind::BatchNorm { .. }
        | OpKind::MaxPool2d { .. }
        | OpKind::AvgPool2d { .. }
        | OpKind::GlobalAvgPool2d => Some(Phase::Vision),
        OpKind::Embedding => Some(Phase::Embedding),
        OpKind::KvCache { .. } | OpKind::KvCacheRead { .. } | OpKind::CachedAttention { .. } => {
            Some(Phase::Decode)
        }
        OpKind::KvCacheAppend if node.inputs.len() == 3 => Some(Phase::Decode),
        _ => None,
    }
}

/// Analyses a graph whose edges are valid (see [`Graph::validate`]).
pub fn analyze(graph: &Graph) -> Analysis {
    let consumers = graph.consumers();
    analyze_with(graph, &consumers)
}

/// [`analyze`] with consumer lists the caller already built.
pub fn analyze_with(graph: &Graph, consumers: &Consumers) -> Analysis {
    let nodes = graph.nodes();
    let n = nodes.len();
    let mut a = Analysis {
        workload: WorkloadClass::Other,
        attention_blocks: Vec::new(),
        conv_stages: Vec::new(),
        kv_caches: Vec::new(),
        kv_reads: Vec::new(),
        kv_appends: Vec::new(),
        fusable_chains: Vec::new(),
        phase: Vec::with_capacity(n),
        residency: nodes.iter().map(Node::residency).collect(),
        colocation: nodes
            .iter()
            .map(|x| x.semantics.colocation_group.clone())
            .collect(),
        fusion: nodes
            .iter()
            .map(|x| x.semantics.fusion_group.clone())
            .collect(),
    };
    a.workload = scan_patterns(graph, &mut a);
    let cache_of = kv_colocation(nodes, consumers, &mut a);
    for node in nodes {
        if let OpKind::Attention { .. } | OpKind::CachedAttention { .. } = node.op {
            a.attention_blocks.push(AttentionBlock {
                attention: node.id,
                kv_cache: cache_of[node.id.index()],
            });
        }
    }
    a.attention_blocks.sort_by_key(|b| b.attention);
    fusable_chains(graph, consumers, &mut a);
    a.phase = phases(graph, &a, &cache_of);
    a
}

/// One pass over the nodes: records convolution stages, unfused attention (a softmax over a
/// matmul) and the KV-cache nodes in `a`, and classifies the workload.
fn scan_patterns(graph: &Graph, a: &mut Analysis) -> WorkloadClass {
    let (mut conv, mut attn, mut llm_hint) = (false, false, false);
    for node in graph.nodes() {
        match &node.op {
            OpKind::Conv2d { .. } => {
                conv = true;
                let spatial = node
                    .outputs
                    .first()
                    .and_then(|m| Some([*m.shape.get(2)?, *m.shape.get(3)?]))
                    .unwrap_or([0, 0]);
                match a.conv_stages.last_mut() {
                    Some(s) if s.spatial == spatial => s.convs.push(node.id),
                    _ => a.conv_stages.push(ConvStage {
                        spatial,
                        convs: vec![node.id],
                    }),
                }
            }
            OpKind::Attention { .. } | OpKind::CachedAttention { .. } => attn = true,
            OpKind::Softmax { .. } => {
                // An unfused attention: softmax over the output of a matmul.
                let from_matmul = node
                    .inputs
                    .first()
                    .and_then(|t| graph.node(t.node))
                    .is_some_and(|p| matches!(p.op, OpKind::MatMul { .. }));
                if from_matmul {
                    attn = true;
                    a.attention_blocks.push(AttentionBlock {
                        attention: node.id,
                        kv_cache: None,
                    });
                }
            }
            OpKind::KvCache { .. } => a.kv_caches.push(node.id),
            OpKind::KvCacheRead { .. } => a.kv_reads.push(node.id),
            OpKind::KvCacheAppend => a.kv_appends.push(node.id),
            OpKind::Embedding => llm_hint = true,
            _ => {}
        }
    }
    llm_hint |= attn || !a.kv_caches.is_empty() || !a.kv_appends.is_empty();
    match (llm_hint, conv) {
        (true, true) => WorkloadClass::Multimodal,
        (true, false) => WorkloadClass::Llm,
        (false, true) => WorkloadClass::Vision,
        (false, false) => WorkloadClass::Other,
    }
}

/// KV co-location groups (cache → append → reads → attention, or the caches of one
/// [`OpKind::CachedAttention`] with it), named `kv.<cache id>` where the frontend gave no group; returns, per node, the KV cache whose group it joined.
fn kv_colocation(nodes: &[Node], consumers: &Consumers, a: &mut Analysis) -> Vec<Option<NodeId>> {
    let mut cache_of = vec![None::<NodeId>; nodes.len()];
    for &c in &a.kv_caches {
        // The caches of one batched attention share a group, named after its first cache.
        let head = consumers
            .of(c)
            .iter()
            .find(|&&x| matches!(nodes[x.index()].op, OpKind::CachedAttention { .. }))
            .and_then(|&x| nodes[x.index()].inputs.get(3))
            .map_or(c, |t| t.node);
        let group = format!("kv.{}", head.0);
        let mut members = vec![c];
        for &app in consumers.of(c) {
            // A batched decode step's attention appends to its caches and reads them itself.
            if matches!(nodes[app.index()].op, OpKind::CachedAttention { .. }) {
                members.push(app);
                continue;
            }
            if !matches!(nodes[app.index()].op, OpKind::KvCacheAppend) {
                continue;
            }
            members.push(app);
            for &r in consumers.of(app) {
                if !matches!(nodes[r.index()].op, OpKind::KvCacheRead { .. }) {
                    continue;
                }
                members.push(r);
                for &at in consumers.of(r) {
                    if matches!(nodes[at.index()].op, OpKind::Attention { .. }) {
                        members.push(at);
                    }
                }
            }
        }
        for m in members {
            cache_of[m.index()] = Some(c);
            if a.colocation[m.index()].is_none() {
                a.colocation[m.index()] = Some(group.clone());
            }
        }
    }
    cache_of
}

/// Fusable chains: a linear, matmul or convolution followed by elementwise ops or batch norms,
/// each the single consumer of the one before and not a graph output; groups named
/// `fuse.<head id>` where the frontend gave no fusion group.
fn fusable_chains(graph: &Graph, consumers: &Consumers, a: &mut Analysis) {
    let nodes = graph.nodes();
    let n = nodes.len();
    let mut is_output = vec![false; n];
    for t in &graph.outputs {
        if let Some(x) = is_output.get_mut(t.node.index()) {
            *x = true;
        }
    }
    let mut in_chain = vec![false; n];
    for node in nodes {
        let head = matches!(
            node.op,
            OpKind::Linear { .. } | OpKind::MatMul { .. } | OpKind::Conv2d { .. }
        );
        if !head || in_chain[node.id.index()] {
            continue;
        }
        let mut chain = vec![node.id];
        let mut cur = node.id;
        loop {
            let next = consumers.of(cur);
            if next.len() != 1 || is_output[cur.index()] {
                break;
            }
            let nx = &nodes[next[0].index()];
            let fusable = nx.op.is_elementwise() || matches!(nx.op, OpKind::BatchNorm { .. });
            if !fusable || in_chain[nx.id.index()] {
                break;
            }
            chain.push(nx.id);
            cur = nx.id;
        }
        if chain.len() >= 2 {
            let group = format!("fuse.{}", node.id.0);
            for &m in &chain {
                in_chain[m.index()] = true;
                if a.fusion[m.index()].is_none() {
                    a.fusion[m.index()] = Some(group.clone());
                }
            }
            a.fusable_chains.push(chain);
        }
    }
}

/// Phases: annotation, else intrinsic, else inherited from producers, else the workload's
/// default. Nodes are visited in a topological order so that producers come first.
fn phases(graph: &Graph, a: &Analysis, cache_of: &[Option<NodeId>]) -> Vec<Phase> {
    let nodes = graph.nodes();
    let n = nodes.len();
    let default_phase = match a.workload {
        WorkloadClass::Vision => Phase::Vision,
        WorkloadClass::Llm | WorkloadClass::Multimodal if !a.kv_caches.is_empty() => Phase::Decode,
        WorkloadClass::Llm | WorkloadClass::Multimodal => Phase::Prefill,
        WorkloadClass::Other => Phase::Unknown,
    };
    let order = if graph.is_id_ordered() {
        None
    } else {
        graph.topo_order().ok()
    };
    let mut phase = vec![Phase::Unknown; n];
    let mut visit = |v: NodeId| {
        let kv_cached = cache_of[v.index()].is_some();
        phase[v.index()] = phase_of(&nodes[v.index()], kv_cached, &phase, default_phase);
    };
    match order {
        Some(order) => order.into_iter().for_each(&mut visit),
        None => (0..n as u32).for_each(|i| visit(NodeId(i))),
    }
    phase
}

/// The phase of one node, given the phases found so far for its producers; `kv_cached`: the node
/// is in a KV cache's co-location group (an attention there is a decode step).
fn phase_of(node: &Node, kv_cached: bool, phase: &[Phase], default_phase: Phase) -> Phase {
    if node.semantics.phase != Phase::Unknown {
        return node.semantics.phase;
    }
    if let Some(p) = intrinsic_phase(node) {
        return p;
    }
    if matches!(node.op, OpKind::Attention { .. }) && kv_cached {
        return Phase::Decode;
    }
    // Prefer a non-embedding producer phase: after the embeddings comes the model body.
    let mut inherited = Phase::Unknown;
    for t in &node.inputs {
        match phase.get(t.node.index()).copied().unwrap_or(Phase::Unknown) {
            Phase::Unknown => {}
            Phase::Embedding if inherited == Phase::Unknown => inherited = Phase::Embedding,
            Phase::Embedding => {}
            p => {
                inherited = p;
                break;
            }
        }
    }
    match inherited {
        Phase::Unknown | Phase::Embedding
            if !matches!(node.op, OpKind::Input | OpKind::Parameter { .. }) =>
        {
            if inherited == Phase::Embedding && node.op.is_elementwise() {
                Phase::Embedding
            } else {
                default_phase
            }
        }
        p => p,
    }
}

/// Analyses `graph` and writes the inferred phase, residency, co-location and fusion groups into
/// the nodes that lacked them.
pub fn annotate(graph: &mut Graph) -> Analysis {
    let a = analyze(graph);
    for node in graph.nodes_mut() {
        let i = node.id.index();
        let s = &mut node.semantics;
        if s.phase == Phase::Unknown {
            s.phase = a.phase[i];
        }
        if s.residency.is_none() {
            s.residency = Some(a.residency[i]);
        }
        if s.colocation_group.is_none() {
            s.colocation_group = a.colocation[i].clone();
        }
        if s.fusion_group.is_none() {
            s.fusion_group = a.fusion[i].clone();
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::{bert, gpt2_decode, resnet, BertConfig, Gpt2Config, ResNetConfig};

    #[test]
    fn gpt2_decode_patterns_and_kv_groups() {
        let mut g = gpt2_decode(&Gpt2Config::default(), 64).unwrap();
        for n in g.nodes_mut() {
            n.semantics.phase = Phase::Unknown;
            n.semantics.residency = None;
        }
        let a = annotate(&mut g);
        assert_eq!(a.workload, WorkloadClass::Llm);
        assert_eq!(a.kv_caches.len(), 12);
        assert_eq!(a.kv_appends.len(), 12);
        assert_eq!(a.kv_reads.len(), 24);
        assert_eq!(a.attention_blocks.len(), 12);
        assert!(a.attention_blocks.iter().all(|b| b.kv_cache.is_some()));
        for b in &a.attention_blocks {
            let cache = b.kv_cache.unwrap();
            assert_eq!(
                a.colocation[b.attention.index()],
                a.colocation[cache.index()]
            );
            assert!(a.colocation[cache.index()].is_some());
            assert_eq!(a.phase[b.attention.index()], Phase::Decode);
        }
        // c_fc → gelu is a fusable chain.
        let fc = g
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.mlp.c_fc.out")
            .unwrap()
            .id;
        assert!(a.fusable_chains.iter().any(|c| c[0] == fc && c.len() == 2));
        let cache = a.kv_caches[0];
        assert_eq!(
            g.node(cache).unwrap().semantics.residency,
            Some(Residency::StatefulKvCache)
        );
        let wte = g.nodes().iter().find(|n| n.name == "wte.weight").unwrap();
        assert_eq!(wte.semantics.residency, Some(Residency::PersistentWeight));
        let c_fc = g.node(fc).unwrap();
        assert_eq!(c_fc.semantics.phase, Phase::Decode);
    }

    #[test]
    fn bert_and_resnet_classes() {
        let b = analyze(
            &bert(&BertConfig {
                layers: 2,
                ..BertConfig::default()
            })
            .unwrap(),
        );
        assert_eq!(b.workload, WorkloadClass::Llm);
        assert_eq!(b.attention_blocks.len(), 2);
        assert!(b.kv_caches.is_empty());
        let r = analyze(&resnet(&ResNetConfig::default()).unwrap());
        assert_eq!(r.workload, WorkloadClass::Vision);
        // Stem at 112², then stages at 56², 28², 14², 7² (a downsampling block's first 1×1 conv
        // still runs at the previous resolution).
        let sizes: Vec<usize> = r.conv_stages.iter().map(|s| s.spatial[0]).collect();
        assert_eq!(sizes[0], 112);
        assert!(sizes.contains(&7) && sizes.contains(&56));
        assert_eq!(
            r.conv_stages.iter().map(|s| s.convs.len()).sum::<usize>(),
            53
        );
        // conv → bn (→ relu) chains.
        assert!(r.fusable_chains.len() >= 50);
    }
}
