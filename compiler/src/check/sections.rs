//! Reading each section into its part of the model: keys, types, ranges, DSL strings and the
//! cross-field rules within and between sections.

use toml::de::DeValue;

use super::reader::Section;
use super::*;
use crate::dsl::expr::parse_expr;
use crate::dsl::pattern::parse_pattern;
use crate::dsl::stack::parse_stack;

impl<'a, 't> Checker<'a, 't> {
    pub(super) fn model_section(
        &self,
        s: &Section<'a, 't>,
        spans: &mut Spans,
    ) -> Option<PartialModel> {
        let name = match s.req_string("name", "the model's name") {
            Some(n)
                if n.value.trim().is_empty()
                    || n.value.chars().count() > 128
                    || n.value.chars().any(char::is_control) =>
            {
                self.sink.error(
                    Rule::Range,
                    n.span.clone(),
                    "`model.name` must be 1 to 128 characters with no control characters",
                    "invalid name",
                );
                None
            }
            Some(n) => Some(n.value),
            None => None,
        };
        let vocab = s.req_int("vocab", 1..=MAX_VOCAB, "vocabulary size");
        let d_model = s.req_int("d_model", 1..=MAX_DIM, "residual width");
        let max_positions = s.req_int("max_positions", 1..=MAX_VOCAB, "longest supported sequence");
        let layers = match s.req_string("layers", "a layer stack such as \"dense*3, moe*58\"") {
            Some(st) => {
                spans.layers = st.span.clone();
                match parse_stack(&st.value) {
                    Ok(l) if l.len() > MAX_LAYERS => {
                        self.sink.error(
                            Rule::Range,
                            st.span.clone(),
                            format!(
                                "the layer stack has {} layers; at most {MAX_LAYERS} are supported",
                                l.len()
                            ),
                            "too many layers",
                        );
                        None
                    }
                    Ok(l) => Some(l),
                    Err(e) => {
                        self.sink.dsl_error(&st, "layer stack", e);
                        None
                    }
                }
            }
            None => None,
        };
        let positions = s.choice_or(
            "positions",
            &[("rope", Positions::Rope), ("learned", Positions::Learned)],
            Positions::Rope,
        );
        let norm_kind = s.choice_or(
            "norm",
            &[
                ("rmsnorm", NormKind::RmsNorm),
                ("layernorm", NormKind::LayerNorm),
            ],
            NormKind::RmsNorm,
        );
        let eps = s.float_or("norm_eps", |x| x > 0.0 && x < 1.0, "in (0, 1)", 1e-6);
        let tie = s.boolean_or("tie_embeddings", false);
        let init_std = s.float_or("init_std", |x| x > 0.0 && x <= 1.0, "in (0, 1]", 0.02);
        Some(PartialModel {
            name: name?,
            vocab: vocab?,
            d_model: d_model?,
            max_positions: max_positions?,
            layers: layers?,
            positions: positions?,
            norm: Norm {
                kind: norm_kind?,
                eps: eps?,
            },
            tie_embeddings: tie?,
            init_std: init_std?,
        })
    }

    pub(super) fn attention(
        &self,
        s: &Section<'a, 't>,
        m: Option<&PartialModel>,
        positions: Option<Positions>,
    ) -> Option<Attention> {
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            Mha,
            Gqa,
            Mla,
        }
        const KINDS: [(&str, Kind); 3] =
            [("mha", Kind::Mha), ("gqa", Kind::Gqa), ("mla", Kind::Mla)];
        let kind = s.req_choice("kind", &KINDS);
        let heads = s.req_int("heads", 1..=1 << 14, "number of attention heads");
        let bias = s.boolean_or("bias", false);
        let kind = kind?;
        let mla_keys = ["q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim"];
        let std_keys = ["kv_heads", "head_dim"];
        let (own, other): (&[&str], &[&str]) = if kind == Kind::Mla {
            (&mla_keys, &std_keys)
        } else {
            (&std_keys, &mla_keys)
        };
        let kind_span = s.span_of("kind");
        for k in other {
            if s.has(k) {
                self.sink.push(
                    Diagnostic::new(
                        Rule::Conflict,
                        s.span_of(k),
                        format!(
                            "`attention.{k}` does not apply to attention kind `{}`",
                            KINDS
                                .iter()
                                .find(|(_, x)| *x == kind)
                                .map_or("", |(n, _)| *n)
                        ),
                        "not used by this attention kind",
                    )
                    .with_related(kind_span.clone(), "attention kind set here")
                    .with_help(format!(
                        "keys for this kind: kind, heads, bias, rope, {}",
                        own.join(", ")
                    )),
                );
            }
        }
        let rope_section = s.table("rope", ROPE_KEYS);
        let ak = match kind {
            Kind::Mla => {
                let q_rank = s.int("q_rank", 1..=MAX_DIM);
                let q_bad = s.has("q_rank") && q_rank.is_none();
                let kv_rank = s.req_int("kv_rank", 1..=MAX_DIM, "latent KV rank");
                let nope = s.req_int("nope_dim", 1..=1 << 16, "per-head q/k dims without RoPE");
                let rope = s.req_int("rope_dim", 2..=1 << 16, "per-head dims with RoPE");
                let v = s.req_int("v_dim", 1..=1 << 16, "per-head value dims");
                let rope = rope.and_then(|r| self.even(s, "rope_dim", r));
                if positions == Some(Positions::Learned) {
                    self.sink.push(
                        Diagnostic::new(
                            Rule::Conflict,
                            kind_span.clone(),
                            "MLA needs rotary positions, but `model.positions` is \"learned\"",
                            "MLA's decoupled RoPE key",
                        )
                        .with_help("set `model.positions = \"rope\"`"),
                    );
                }
                if q_bad {
                    return None;
                }
                let mla = Mla {
                    q_rank,
                    kv_rank: kv_rank?,
                    nope_dim: nope?,
                    rope_dim: rope?,
                    v_dim: v?,
                };
                AttentionKind::Latent(mla)
            }
            Kind::Mha | Kind::Gqa => {
                let heads = heads?;
                let kv_heads = match kind {
                    Kind::Gqa => s.req_int("kv_heads", 1..=1 << 14, "number of key/value heads"),
                    _ => {
                        let kv = s.int("kv_heads", 1..=1 << 14);
                        if let Some(kv) = kv.filter(|&kv| kv != heads) {
                            self.sink.push(Diagnostic::new(
                                Rule::Conflict,
                                s.span_of("kv_heads"),
                                format!("multi-head attention has one KV head per query head ({heads}), but `kv_heads` is {kv}"),
                                "must equal `heads` for mha",
                            ).with_help("use `kind = \"gqa\"` for grouped-query attention"));
                            None
                        } else {
                            Some(heads)
                        }
                    }
                };
                let head_dim = match s.int("head_dim", 1..=1 << 16) {
                    Some(h) => Some(h),
                    None if s.has("head_dim") => None,
                    None => {
                        let d = m?.d_model;
                        if d % heads != 0 {
                            self.sink.push(Diagnostic::new(
                                Rule::Divisible,
                                s.span_of("heads"),
                                format!("`model.d_model` ({d}) is not divisible by `attention.heads` ({heads}), so the head dimension cannot default to d_model / heads"),
                                "does not divide d_model",
                            ).with_help("set `attention.head_dim` explicitly"));
                            None
                        } else {
                            Some(d / heads)
                        }
                    }
                };
                let kv_heads = kv_heads?;
                if heads % kv_heads != 0 {
                    self.sink.push(Diagnostic::new(
                        Rule::Divisible,
                        s.span_of("kv_heads"),
                        format!("`attention.heads` ({heads}) must be divisible by `attention.kv_heads` ({kv_heads})"),
                        format!("{heads} query heads cannot be shared evenly by {kv_heads} KV heads"),
                    ).with_related(s.span_of("heads"), "query heads"));
                    return None;
                }
                let head_dim = head_dim?;
                let head_dim = if positions == Some(Positions::Rope) {
                    self.even(s, "head_dim", head_dim)?
                } else {
                    head_dim
                };
                AttentionKind::Grouped { kv_heads, head_dim }
            }
        };
        let rope = match positions? {
            Positions::Learned => {
                // With MLA, "MLA needs rotary positions" above is the one error to report.
                if let (Some(r), false) = (&rope_section, kind == Kind::Mla) {
                    self.sink.push(
                        Diagnostic::new(
                            Rule::Conflict,
                            r.span.clone(),
                            "[attention.rope] has no effect with learned positions",
                            "unused",
                        )
                        .with_help("remove it, or set `model.positions = \"rope\"`"),
                    );
                    return None;
                }
                None
            }
            Positions::Rope => Some(match &rope_section {
                Some(r) => self.rope(r, m)?,
                None if s.has("rope") => return None,
                None => Rope {
                    theta: 10000.0,
                    yarn: None,
                },
            }),
        };
        Some(Attention {
            heads: heads?,
            kind: ak,
            bias: bias?,
            rope,
        })
    }

    pub(super) fn even(&self, s: &Section, key: &str, v: u64) -> Option<u64> {
        if v % 2 == 0 {
            return Some(v);
        }
        self.sink.push(Diagnostic::new(
            Rule::Divisible,
            s.span_of(key),
            format!(
                "`{}.{key}` ({v}) must be even: RoPE rotates dimensions in pairs",
                s.name
            ),
            "odd number of rotary dimensions",
        ));
        None
    }

    pub(super) fn rope(&self, r: &Section<'a, 't>, m: Option<&PartialModel>) -> Option<Rope> {
        let theta = r.float_or("theta", |x| x > 0.0 && x <= 1e12, "in (0, 1e12]", 10000.0);
        let yarn = match r.table("yarn", YARN_KEYS) {
            None => (!r.has("yarn")).then_some(None),
            Some(y) => {
                let factor = y.req_float(
                    "factor",
                    |x| (1.0..=1e6).contains(&x),
                    "in [1, 1e6]",
                    "context extension factor",
                );
                let orig = y.req_int(
                    "original_max_positions",
                    1..=MAX_VOCAB,
                    "pretraining context length",
                );
                let beta_fast = y.float_or("beta_fast", positive, "positive", 32.0);
                let beta_slow = y.float_or("beta_slow", positive, "positive", 1.0);
                let mscale = y.float_or("mscale", positive, "positive", 1.0);
                let mscale_all = y.float_or("mscale_all_dim", |x| x >= 0.0, "at least 0", 0.0);
                if let (Some(f), Some(s)) = (beta_fast, beta_slow) {
                    if f <= s {
                        self.sink.push(
                            Diagnostic::new(
                                Rule::Bound,
                                y.span_of("beta_fast"),
                                format!("`{0}.beta_fast` ({f}) must be greater than `{0}.beta_slow` ({s})", y.name),
                                "must exceed beta_slow",
                            )
                            .with_related(y.span_of("beta_slow"), "beta_slow"),
                        );
                    }
                }
                if let (Some(o), Some(m)) = (orig, m) {
                    if o > m.max_positions {
                        self.sink.push(Diagnostic::new(
                            Rule::Bound,
                            y.span_of("original_max_positions"),
                            format!("`{}.original_max_positions` ({o}) exceeds `model.max_positions` ({}); YaRN extends a shorter context", y.name, m.max_positions),
                            "longer than the extended context",
                        ));
                    }
                }
                Some(Some(Yarn {
                    factor: factor?,
                    original_max_positions: orig?,
                    beta_fast: beta_fast?,
                    beta_slow: beta_slow?,
                    mscale: mscale?,
                    mscale_all_dim: mscale_all?,
                }))
            }
        };
        Some(Rope {
            theta: theta?,
            yarn: yarn?,
        })
    }

    pub(super) fn activation(
        &self,
        s: &Section,
        default: Option<&Activation>,
    ) -> Option<Activation> {
        let Some(st) = s.string("act") else {
            if s.has("act") {
                return None;
            }
            return Some(default.cloned().unwrap_or_else(|| {
                Activation {
                    expr: parse_expr("silu(gate) * up", &["gate", "up"])
                        .expect("the default activation parses"),
                    gated: true,
                }
            }));
        };
        let expr = match parse_expr(&st.value, &["x", "gate", "up"]) {
            Ok(e) => e,
            Err(e) => {
                self.sink.dsl_error(&st, "activation expression", e);
                return None;
            }
        };
        let vars = expr.vars();
        let has = |v: &str| vars.contains(&v);
        let gated = match (has("x"), has("gate"), has("up")) {
            (true, false, false) => false,
            (false, true, true) => true,
            _ => {
                self.sink.push(Diagnostic::new(
                    Rule::Dsl,
                    st.span.clone(),
                    format!("activation `{}` must read either `x` alone (one input projection) or both `gate` and `up` (two)", st.value),
                    format!("reads: {}", if vars.is_empty() { "no variable".to_string() } else { vars.join(", ") }),
                ).with_help("e.g. \"gelu_tanh(x)\" or \"silu(gate) * up\""));
                return None;
            }
        };
        Some(Activation { expr, gated })
    }

    pub(super) fn ffn(&self, s: &Section<'a, 't>) -> Option<Ffn> {
        let hidden = s.req_int("hidden", 1..=MAX_DIM * 4, "hidden width");
        let act = self.activation(s, None);
        let bias = s.boolean_or("bias", false);
        Some(Ffn {
            hidden: hidden?,
            act: act?,
            bias: bias?,
        })
    }

    pub(super) fn moe(&self, s: &Section<'a, 't>, ffn: Option<&Ffn>) -> Option<Moe> {
        let experts = s.req_int("experts", 1..=1 << 16, "routed experts per layer");
        let shared = s.int_or("shared", 0..=1 << 10, 0);
        let top_k = s.req_int("top_k", 1..=1 << 16, "experts per token");
        let eh = s.req_int(
            "expert_hidden",
            1..=MAX_DIM * 4,
            "hidden width of one expert",
        );
        let act = self.activation(s, ffn.map(|f| &f.act));
        let score = s.req_choice(
            "score",
            &[
                ("softmax", ScoreFunc::Softmax),
                ("sigmoid", ScoreFunc::Sigmoid),
            ],
        );
        let select = s.choice_or(
            "select",
            &[
                ("greedy", Selection::Greedy),
                ("group_limited", Selection::GroupLimited),
            ],
            Selection::Greedy,
        );
        let groups = s.int_or("groups", 1..=1 << 16, 1);
        let kept = s.int("groups_kept", 1..=1 << 16);
        let kept_ok = kept.is_some() || !s.has("groups_kept");
        let group_score = s.choice_or(
            "group_score",
            &[("max", GroupScore::Max), ("top2_sum", GroupScore::Top2Sum)],
            GroupScore::Top2Sum,
        );
        let normalize = s.boolean_or("normalize_top_k", false);
        let route_scale = s.float_or("route_scale", |x| x > 0.0 && x <= 1e4, "in (0, 1e4]", 1.0);
        let bias_update = s.float_or("bias_update", |x| (0.0..1.0).contains(&x), "in [0, 1)", 0.0);
        let seq_aux = s.float_or("seq_aux", |x| (0.0..1.0).contains(&x), "in [0, 1)", 0.0);

        // Each rule runs when the values it reads are valid, whatever else is wrong, so one
        // pass reports every independent mistake.
        let kept = if kept_ok {
            groups.map(|g| kept.unwrap_or(g))
        } else {
            None
        };
        let mut ok = true;
        if let (Some(Selection::Greedy), Some(g), Some(k)) = (select, groups, kept) {
            if g > 1 || k != g {
                let key = if s.has("groups") {
                    "groups"
                } else {
                    "groups_kept"
                };
                self.sink.push(Diagnostic::new(
                    Rule::Conflict,
                    s.span_of(key),
                    "expert groups only matter for group-limited selection, but `moe.select` is \"greedy\"",
                    "has no effect with greedy selection",
                ).with_help("set `select = \"group_limited\"`, or remove `groups` and `groups_kept`"));
                ok = false;
            }
        }
        let mut per_group = None;
        if let (Some(e), Some(g)) = (experts, groups) {
            if e % g != 0 {
                self.sink.push(
                    Diagnostic::new(
                        Rule::Divisible,
                        s.span_of("groups"),
                        format!("`moe.experts` ({e}) must be divisible by `moe.groups` ({g})"),
                        "does not divide the experts evenly",
                    )
                    .with_related(s.span_of("experts"), "routed experts"),
                );
                ok = false;
            } else {
                per_group = Some(e / g);
            }
        }
        if let (Some(g), Some(k)) = (groups, kept) {
            if k > g {
                self.sink.push(
                    Diagnostic::new(
                        Rule::Bound,
                        s.span_of("groups_kept"),
                        format!("`moe.groups_kept` ({k}) cannot exceed `moe.groups` ({g})"),
                        "more groups kept than exist",
                    )
                    .with_related(s.span_of("groups"), "groups"),
                );
                ok = false;
            } else if let (Some(n), Some(top_k), Some(select), Some(e)) =
                (per_group, top_k, select, experts)
            {
                let reachable = n * k;
                if top_k > reachable {
                    let why = if select == Selection::GroupLimited {
                        format!("{n} experts per group × {k} groups kept = {reachable}")
                    } else {
                        format!("there are {e} experts")
                    };
                    self.sink.push(Diagnostic::new(
                        Rule::Bound,
                        s.span_of("top_k"),
                        format!(
                            "`moe.top_k` ({top_k}) exceeds the experts a token can reach: {why}"
                        ),
                        format!("at most {reachable}"),
                    ));
                    ok = false;
                }
            }
        }
        if let (Some(Selection::GroupLimited), Some(GroupScore::Top2Sum), Some(n)) =
            (select, group_score, per_group)
        {
            if n < 2 {
                self.sink.push(Diagnostic::new(
                    Rule::Bound,
                    s.span_of("group_score"),
                    format!("`group_score = \"top2_sum\"` needs at least 2 experts per group; there are {n}"),
                    "groups are too small",
                ).with_help("use `group_score = \"max\"` or fewer groups"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let (experts, top_k, groups, select, kept, group_score) =
            (experts?, top_k?, groups?, select?, kept?, group_score?);
        Some(Moe {
            experts,
            shared: shared?,
            top_k,
            expert_hidden: eh?,
            act: act?,
            score: score?,
            select,
            groups,
            groups_kept: kept,
            group_score,
            normalize_top_k: normalize?,
            route_scale: route_scale?,
            bias_update: bias_update?,
            seq_aux: seq_aux?,
        })
    }

    pub(super) fn rl(&self, s: &Section<'a, 't>, m: Option<&PartialModel>) -> Option<Rl> {
        let d = Rl::DEFAULT;
        let positions = m.map_or(1 << 20, |m| m.max_positions);
        let unit = |x: f64| x > 0.0 && x < 1.0;
        let group = s.int_or("group", 2..=1024, d.group);
        let questions = s.int_or("questions", 1..=4096, d.questions);
        let steps = s.int_or("steps", 1..=1 << 40, d.steps);
        let lr = s.float_or("lr", |x| x > 0.0 && x <= 1.0, "in (0, 1]", d.lr);
        let clip = s.float_or("clip", unit, "in (0, 1)", d.clip);
        let kl = s.float_or("kl", |x| (0.0..=100.0).contains(&x), "in [0, 100]", d.kl);
        let ref_reset = s
            .int_or("ref_reset", 0..=1 << 40, 0)
            .map(|n| (n > 0).then_some(n));
        let max_completion = s.int_or(
            "max_completion",
            1..=positions.saturating_sub(1).max(1),
            d.max_completion,
        );
        let temperature = s.float_or(
            "temperature",
            |x| x > 0.0 && x <= 100.0,
            "in (0, 100]",
            d.temperature,
        );
        let top_k = s.int_or("top_k", 0..=MAX_VOCAB, d.top_k);
        let updates = s.int_or("updates", 1..=64, d.updates);
        let answer = s.choice_or(
            "answer",
            &[
                ("plain", AnswerFormat::Plain),
                ("tagged", AnswerFormat::Tagged),
            ],
            d.answer,
        );
        let weight = |x: f64| (0.0..=100.0).contains(&x);
        let accuracy_weight =
            s.float_or("accuracy_weight", weight, "in [0, 100]", d.accuracy_weight);
        let format_weight = s.float_or("format_weight", weight, "in [0, 100]", d.format_weight);
        Some(Rl {
            group: group?,
            questions: questions?,
            steps: steps?,
            lr: lr?,
            clip: clip?,
            kl: kl?,
            ref_reset: ref_reset?,
            max_completion: max_completion?,
            temperature: temperature?,
            top_k: top_k?,
            updates: updates?,
            answer: answer?,
            accuracy_weight: accuracy_weight?,
            format_weight: format_weight?,
        })
    }

    /// `[parallel]`'s values; the rules that relate them to the model are
    /// [`Parallel::problems`], which the caller applies.
    pub(super) fn parallel(&self, s: &Section<'a, 't>) -> Option<Parallel> {
        let degree = 1..=MAX_DEGREE;
        let dp = s.int_or("dp", degree.clone(), 1);
        let ep = s.int_or("ep", degree.clone(), 1);
        let pp = s.int_or("pp", degree.clone(), 1);
        let tp = s.int_or("tp", degree.clone(), 1);
        if tp.is_some_and(|t| t != 1) {
            self.sink.push(
                Diagnostic::new(
                    Rule::Layout,
                    s.span_of("tp"),
                    "tensor parallelism is not supported",
                    "here",
                )
                .with_help(TP_UNSUPPORTED),
            );
        }
        let schedule = s.choice_or("schedule", &PipeSchedule::CHOICES, PipeSchedule::OneFOneB);
        let zero = s.int_or("zero", 0..=1, 0).map(|z| z as u8);
        let micro_batch = s
            .has("micro_batch")
            .then(|| s.int("micro_batch", degree.clone()));
        let grad_accum = s.has("grad_accum").then(|| s.int("grad_accum", degree));
        let recompute = match s.string_array("recompute") {
            None if s.has("recompute") => None,
            None => Some(Recompute::default()),
            Some(names) => {
                let choices = Recompute::CHOICES.map(|c| (c, c));
                let found: Vec<Option<&str>> = names
                    .iter()
                    .map(|n| s.lookup("recompute", n, &choices))
                    .collect();
                found.iter().all(Option::is_some).then(|| {
                    let mut r = Recompute::default();
                    for name in found.into_iter().flatten() {
                        r.enable(name);
                    }
                    r
                })
            }
        };
        Some(Parallel {
            dp: dp?,
            ep: ep?,
            pp: pp?,
            schedule: schedule?,
            zero: zero?,
            micro_batch: micro_batch.map_or(Some(None), |m| m.map(Some))?,
            grad_accum: grad_accum.map_or(Some(None), |g| g.map(Some))?,
            recompute: recompute?,
        })
        .filter(|_| tp == Some(1))
    }

    pub(super) fn mtp(&self, s: &Section<'a, 't>, layers: Option<&[LayerKind]>) -> Option<Mtp> {
        let depth = s.req_int("depth", 1..=16, "number of extra tokens predicted");
        let weight = s.float_or("weight", |x| x > 0.0 && x <= 100.0, "in (0, 100]", 0.3);
        let block = match s.choice("block", LAYER_KINDS) {
            Some(b) => Some(b),
            None if s.has("block") => None,
            None => layers?.last().copied(),
        };
        Some(Mtp {
            depth: depth?,
            weight: weight?,
            block: block?,
        })
    }

    pub(super) fn format(
        &self,
        s: &Section,
        key: &str,
        default: Format,
        allow_fp8: bool,
    ) -> Option<Format> {
        let f = s.choice_or(key, FORMATS, default)?;
        if f.is_fp8() && !allow_fp8 {
            self.sink.push(Diagnostic::new(
                Rule::UnknownValue,
                s.span_of(key),
                format!("`precision.{key}` cannot be an FP8 format ({f})"),
                "FP8 not supported here",
            ).with_help("use fp32, bf16 or fp16; FP8 applies to GEMM operands (linear, linear_grad, head) and the KV cache"));
            return None;
        }
        Some(f)
    }

    pub(super) fn precision(&self, s: &Section<'a, 't>, spans: &mut Spans) -> Option<Precision> {
        spans.linear = s.span_of("linear");
        spans.linear_grad = s.span_of("linear_grad");
        spans.head = s.span_of("head");
        let compute = self.format(s, "compute", Format::Bf16, false);
        let c = compute.unwrap_or(Format::Bf16);
        let linear = self.format(s, "linear", c, true);
        let linear_grad = self.format(s, "linear_grad", linear.unwrap_or(c), true);
        let embed = self.format(s, "embed", c, false);
        let head = self.format(s, "head", c, true);
        let router = self.format(s, "router", c, false);
        let norm = self.format(s, "norm", c, false);
        let attn_core = self.format(s, "attn_core", c, false);
        let act = self.format(s, "act", c, false);
        let keep_format = self.format(s, "keep_format", c, false);
        let master = self.format(s, "master", Format::Fp32, false);
        let grads = self.format(s, "grads", Format::Fp32, false);
        let moments = self.format(s, "moments", Format::Fp32, false);
        let kv_cache = self.format(s, "kv_cache", c, true);
        let mut keep = Some(Vec::new());
        for p in s.string_array("keep").unwrap_or_default() {
            match parse_pattern(&p.value) {
                Ok(pat) => {
                    spans.keep.push(p.span.clone());
                    if let Some(k) = keep.as_mut() {
                        k.push(pat);
                    }
                }
                Err(e) => {
                    self.sink.dsl_error(&p, "op pattern", e);
                    keep = None;
                }
            }
        }
        if s.has("keep") && s.get("keep").is_some_and(|v| !v.get_ref().is_array()) {
            keep = None;
        }
        let fp8_used = [linear, linear_grad, head]
            .iter()
            .any(|f| f.is_some_and(Format::is_fp8));
        let fp8 = match s.table("fp8", FP8_KEYS) {
            Some(t) => {
                spans.fp8 = t.span.clone();
                for key in ["act_tile", "weight_block"] {
                    if t.has(key) {
                        spans.fp8_keys.push((key, t.span_of(key)));
                    }
                }
                self.fp8(&t).map(Some)
            }
            None if s.has("fp8") => None,
            None => Some(Some(Fp8::DEEPSEEK_V3)),
        };
        Some(Precision {
            compute: compute?,
            linear: linear?,
            linear_grad: linear_grad?,
            embed: embed?,
            head: head?,
            router: router?,
            norm: norm?,
            attn_core: attn_core?,
            act: act?,
            keep: keep?,
            keep_format: keep_format?,
            fp8: if fp8_used { fp8? } else { None },
            master: master?,
            grads: grads?,
            moments: moments?,
            kv_cache: kv_cache?,
        })
    }

    pub(super) fn fp8(&self, t: &Section<'a, 't>) -> Option<Fp8> {
        let d = Fp8::DEEPSEEK_V3;
        let mut tile = t.int_array_or::<2>("act_tile", 1..=1 << 16, d.act_tile);
        let block = t.int_array_or::<2>("weight_block", 1..=1 << 16, d.weight_block);
        if let Some([rows, _]) = tile {
            if rows != 1 {
                tile = None;
                self.sink.push(
                    Diagnostic::new(
                        Rule::Range,
                        t.span_of("act_tile"),
                        format!("activation tiles span one row (one token); found {rows} rows"),
                        "first element must be 1",
                    )
                    .with_help("DeepSeek-V3 uses `act_tile = [1, 128]`"),
                );
            }
        }
        let scale = t.choice_or(
            "scale",
            &[("fp32", ScaleFormat::Fp32), ("pow2", ScaleFormat::Pow2)],
            d.scale,
        );
        let promote = match t.int("promote_every", 0..=1 << 20) {
            Some(0) => Some(None),
            Some(n) => Some(Some(n)),
            None if t.has("promote_every") => None,
            None => Some(d.promote_every),
        };
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            H100,
            Truncate,
        }
        let kind = t.choice_or(
            "accumulator",
            &[("h100", Kind::H100), ("truncate", Kind::Truncate)],
            Kind::H100,
        );
        let bits = t.int_or("accumulator_bits", 1..=23, 14);
        if kind == Some(Kind::H100) && t.has("accumulator_bits") {
            let mut d = Diagnostic::new(
                Rule::Conflict,
                t.span_of("accumulator_bits"),
                "`accumulator_bits` sets the truncating model's width, but the accumulator is \
                 the h100 model, which keeps 13 fraction bits",
                "not used by the h100 model",
            )
            .with_help(
                "add `accumulator = \"truncate\"` to model a truncating accumulator of this \
                 width, or remove `accumulator_bits`",
            );
            if t.has("accumulator") {
                d = d.with_related(t.span_of("accumulator"), "accumulator set here");
            }
            self.sink.push(d);
            return None;
        }
        let accumulator = match kind? {
            Kind::H100 => Accumulator::H100,
            Kind::Truncate => Accumulator::Truncate { bits: bits? as u32 },
        };
        Some(Fp8 {
            act_tile: tile?,
            weight_block: block?,
            scale: scale?,
            promote_every: promote?,
            accumulator,
        })
    }

    pub(super) fn train(&self, s: &Section<'a, 't>, m: Option<&PartialModel>) -> Option<Train> {
        let batch = s.req_int("batch", 1..=1 << 20, "sequences per step");
        let seq_len = s.req_int("seq_len", 1..=MAX_VOCAB, "tokens per sequence");
        if let (Some(t), Some(m)) = (seq_len, m) {
            if t > m.max_positions {
                self.sink.push(Diagnostic::new(
                    Rule::Bound,
                    s.span_of("seq_len"),
                    format!(
                        "`train.seq_len` ({t}) exceeds `model.max_positions` ({})",
                        m.max_positions
                    ),
                    "longer than the model supports",
                ));
            }
        }
        let steps = s.int_or("steps", 1..=1 << 40, 1000);
        let seed = s.int_or("seed", 0..=u64::MAX >> 1, 0);
        let lr = s.float_or("lr", |x| x > 0.0 && x <= 1.0, "in (0, 1]", 3e-4);
        let betas = match s.get("betas") {
            None => Some([0.9, 0.95]),
            Some(v) => self.betas(s, v),
        };
        let eps = s.float_or("eps", |x| x > 0.0 && x < 1.0, "in (0, 1)", 1e-8);
        let wd = s.float_or(
            "weight_decay",
            |x| (0.0..=10.0).contains(&x),
            "in [0, 10]",
            0.1,
        );
        let kind = s.choice_or(
            "schedule",
            &[
                ("constant", ScheduleKind::Constant),
                ("cosine", ScheduleKind::Cosine),
            ],
            ScheduleKind::Cosine,
        );
        let warmup = s.int_or("warmup", 0..=1 << 40, 0);
        let min_lr = s.float_or("min_lr", |x| x >= 0.0, "at least 0", 0.0);
        let skip = s.boolean_or("skip_nonfinite", false);
        let clip = match s.float(
            "grad_clip",
            |x| x >= 0.0,
            "at least 0 (0 disables clipping)",
        ) {
            Some(c) => Some((c > 0.0).then_some(c)),
            None if s.has("grad_clip") => None,
            None => Some(Some(1.0)),
        };
        let data = match s.string("data") {
            Some(d) if d.value == "builtin" => Some(DataSource::Builtin),
            Some(d) if d.value.trim().is_empty() => {
                self.sink.error(
                    Rule::Range,
                    d.span.clone(),
                    "`train.data` must be \"builtin\" or a path",
                    "empty",
                );
                None
            }
            Some(d) => Some(DataSource::Path(d.value)),
            None => (!s.has("data")).then_some(DataSource::Builtin),
        };
        if let (Some(w), Some(n)) = (warmup, steps) {
            if w > n {
                self.sink.push(Diagnostic::new(
                    Rule::Bound,
                    s.span_of("warmup"),
                    format!("`train.warmup` ({w}) exceeds `train.steps` ({n})"),
                    "longer than the run",
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (min_lr, lr) {
            if lo > hi {
                self.sink.push(Diagnostic::new(
                    Rule::Bound,
                    s.span_of("min_lr"),
                    format!("`train.min_lr` ({lo}) exceeds the peak `train.lr` ({hi})"),
                    "above the peak learning rate",
                ));
            }
        }
        let [beta1, beta2] = betas?;
        Some(Train {
            batch: batch?,
            seq_len: seq_len?,
            steps: steps?,
            seed: seed?,
            optimizer: AdamW {
                lr: lr?,
                beta1,
                beta2,
                eps: eps?,
                weight_decay: wd?,
            },
            schedule: Schedule {
                kind: kind?,
                warmup: warmup?,
                min_lr: min_lr?,
            },
            grad_clip: clip?,
            skip_nonfinite: skip?,
            data: data?,
        })
    }

    pub(super) fn betas(&self, s: &Section, v: &toml::Spanned<DeValue>) -> Option<[f64; 2]> {
        let bad = || {
            self.sink.push(Diagnostic::new(
                Rule::Range,
                v.span(),
                "`train.betas` must be two numbers in [0, 1), e.g. [0.9, 0.95]",
                "expected [beta1, beta2]",
            ));
            None
        };
        let _ = s;
        let DeValue::Array(items) = v.get_ref() else {
            return bad();
        };
        let xs: Vec<f64> = items
            .iter()
            .filter_map(|i| match i.get_ref() {
                DeValue::Float(f) => f.as_str().parse().ok(),
                DeValue::Integer(n) => i64::from_str_radix(n.as_str(), n.radix())
                    .ok()
                    .map(|n| n as f64),
                _ => None,
            })
            .filter(|x| (0.0..1.0).contains(x))
            .collect();
        if xs.len() != 2 || items.iter().count() != 2 {
            return bad();
        }
        Some([xs[0], xs[1]])
    }
}
