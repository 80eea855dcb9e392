//! The `mask` effect: `masking:` settings compiled once at load, and the [`Masker`] a
//! decision carries, built once per combination of `mask` rules and cached.

use std::{collections::HashMap, sync::RwLock};

use crate::masking::objects::{
    MaskLimits, Masker, MaskingSpec, RuleMasking, SpecError, SpecPathPart, check_spec,
    compile_limits,
};

use super::*;

/// Combinations of `mask` rules cached per policy; beyond it a combination is built per
/// request (correct, only slower), so a policy with many `mask` rules cannot grow memory
/// without bound.
const MAX_CACHED_COMBINATIONS: usize = 1024;

/// Most `mask` rules one decision collects without allocating.
const INLINE_MASKS: usize = 8;

/// The masking part of a compiled policy.
#[derive(Debug, Default)]
pub(super) struct PolicyMasking {
    /// Per `mask` rule (by rule index): its settings and its single-rule masker.
    rules: FastMap<u32, (Arc<str>, RuleMasking, Arc<Masker>)>,
    limits: MaskLimits,
    /// Maskers of several `mask` rules matched together, keyed by their rule indexes.
    combos: RwLock<HashMap<Box<[u32]>, Arc<Masker>>>,
}

/// The `mask` rules one request matched before its deciding rule, in policy order.
#[derive(Debug, Default)]
pub(super) struct MaskHits {
    inline: [u32; INLINE_MASKS],
    len: usize,
    more: Vec<u32>,
}

impl MaskHits {
    pub(super) fn push(&mut self, index: u32) {
        if self.len < INLINE_MASKS {
            self.inline[self.len] = index;
            self.len += 1;
        } else {
            if self.more.is_empty() {
                self.more.extend_from_slice(&self.inline);
            }
            self.more.push(index);
        }
    }

    pub(super) fn as_slice(&self) -> &[u32] {
        if self.more.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.more
        }
    }
}

fn at_masking(prefix: &[Seg], e: SpecError) -> InvalidAt {
    let mut path = prefix.to_vec();
    path.push(Seg::Key("masking"));
    for part in e.path {
        path.push(match part {
            SpecPathPart::Key(k) => Seg::Key(k),
            SpecPathPart::Index(i) => Seg::Index(i),
        });
    }
    invalid(path, e.message)
}

impl PolicyMasking {
    /// Checks the top-level `masking:` block and keeps its bounds.
    pub(super) fn top(spec: Option<&MaskingSpec>) -> Result<(MaskingSpec, MaskLimits), InvalidAt> {
        let spec = spec.cloned().unwrap_or_default();
        check_spec(&spec, true).map_err(|e| at_masking(&[], e))?;
        let limits = compile_limits(&spec).map_err(|e| at_masking(&[], e))?;
        Ok((spec, limits))
    }

    /// Compiles rule `index`'s masking (`rule` over `top`), checking how the rule uses it.
    pub(super) fn add_rule(
        &mut self,
        top: &MaskingSpec,
        limits: MaskLimits,
        rule: &RawRule,
        index: u32,
        at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    ) -> Result<(), InvalidAt> {
        self.limits = limits;
        if rule.action != Action::Mask {
            if rule.masking.is_some() {
                return Err(invalid(
                    at(&[Seg::Key("masking")]),
                    format!(
                        "masking settings apply to rules with action: mask, not {}",
                        rule.action
                    ),
                ));
            }
            return Ok(());
        }
        if rule.message.is_some() {
            return Err(invalid(
                at(&[Seg::Key("message")]),
                "a message is shown when a rule denies; a mask rule never denies, so it takes none",
            ));
        }
        let own = rule.masking.clone().unwrap_or_default();
        check_spec(&own, false).map_err(|e| at_masking(&at(&[]), e))?;
        let compiled = RuleMasking::compile(top, &own).map_err(|e| at_masking(&at(&[]), e))?;
        let name: Arc<str> = Arc::from(rule.name.as_str());
        let single = Arc::new(Masker::combine([(name.clone(), &compiled)], limits));
        self.rules.insert(index, (name, compiled, single));
        Ok(())
    }

    /// The masker for the `mask` rules a request matched: shared, built at most once per
    /// combination (up to [`MAX_CACHED_COMBINATIONS`]).
    pub(super) fn masker(&self, hits: &MaskHits) -> Option<Arc<Masker>> {
        let ids = hits.as_slice();
        match ids {
            [] => None,
            [one] => self.rules.get(one).map(|(_, _, m)| m.clone()),
            many => {
                if let Ok(cache) = self.combos.read()
                    && let Some(m) = cache.get(many)
                {
                    return Some(m.clone());
                }
                let parts = many
                    .iter()
                    .filter_map(|i| self.rules.get(i))
                    .map(|(name, rule, _)| (name.clone(), rule));
                let built = Arc::new(Masker::combine(parts, self.limits));
                if let Ok(mut cache) = self.combos.write()
                    && cache.len() < MAX_CACHED_COMBINATIONS
                {
                    cache.insert(many.into(), built.clone());
                }
                Some(built)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Uri};

    use super::*;

    fn decide_on(policy: &Policy, method: &str, uri: &str) -> Decision {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = uri.parse().unwrap();
        let info = RequestInfo::parse(&method, &uri).unwrap();
        decide(policy, &RequestContext::new(&info))
    }

    fn load(body: &str) -> Policy {
        let text = format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}");
        Policy::from_yaml(&text, "policy.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const POLICY: &str = r#"default: allow
masking:
  envNames: [PASSWORD]
rules:
  - name: mask-secrets
    action: mask
    verbs: [get, list, watch]
    resources: [secrets]
  - name: no-secret-writes
    action: deny
    verbs: [create, update, patch, delete]
    resources: [secrets]
  - name: mask-workloads
    action: mask
    verbs: ["*"]
    apiGroups: [apps]
    resources: ["*"]
    masking:
      envNames: [TOKEN]
      paths: [{resources: [deployments], fields: [.spec.x]}]
  - name: mask-everything-in-prod
    action: mask
    verbs: ["*"]
    resources: ["*"]
    namespaces: [prod]
  - name: allow-apps
    action: allow
    verbs: ["*"]
    apiGroups: [apps]
    resources: ["*"]
  - name: mask-health
    action: mask
    verbs: [get]
    nonResourceURLs: ["/healthz"]
"#;

    #[test]
    fn mask_rules_before_the_deciding_rule_accumulate() {
        let p = load(POLICY);
        let names = |d: &Decision| -> Vec<String> {
            d.matched_rules().iter().map(|r| r.to_string()).collect()
        };
        // One mask rule, then the default.
        let d = decide_on(&p, "GET", "/api/v1/namespaces/dev/secrets/db");
        assert_eq!(d.action, Action::Mask);
        assert_eq!(d.rule, None);
        assert_eq!(names(&d), ["mask-secrets"]);
        assert_eq!(
            d.reason(),
            "allowed with masking by Chaperone policy: no rule matched and the default action is allow"
        );
        // A deny decides; the mask rule before it does not turn it into anything else.
        let d = decide_on(&p, "DELETE", "/api/v1/namespaces/prod/secrets/db");
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Deny, Some("no-secret-writes"))
        );
        assert!(d.masking.is_none());
        // Two mask rules, then an allow rule: both named, allow rule last.
        let d = decide_on(&p, "GET", "/apis/apps/v1/namespaces/prod/deployments");
        assert_eq!(d.action, Action::Mask);
        assert_eq!(
            names(&d),
            ["mask-workloads", "mask-everything-in-prod", "allow-apps"]
        );
        // Mask rules after the deciding rule do not apply.
        let d = decide_on(&p, "GET", "/apis/apps/v1/namespaces/dev/deployments");
        assert_eq!(names(&d), ["mask-workloads", "allow-apps"]);
        let d = decide_on(&p, "GET", "/api/v1/namespaces/dev/configmaps");
        assert_eq!((d.action, d.masking.is_none()), (Action::Allow, true));
        // Non-resource mask rules too.
        let d = decide_on(&p, "GET", "/healthz");
        assert_eq!(names(&d), ["mask-health"]);
    }

    #[test]
    fn mask_rules_cover_wider_requests_and_the_writes_that_answer_with_objects() {
        let p = load(POLICY);
        let names = |d: &Decision| -> Vec<String> {
            d.matched_rules().iter().map(|r| r.to_string()).collect()
        };
        // A list or watch across all namespaces returns prod's objects too.
        for uri in ["/api/v1/configmaps", "/api/v1/configmaps?watch=1"] {
            let d = decide_on(&p, "GET", uri);
            assert_eq!(d.action, Action::Mask, "{uri}");
            assert_eq!(names(&d), ["mask-everything-in-prod"], "{uri}");
        }
        // Another namespace's do not, nor a request on one cluster-scoped object.
        for uri in [
            "/api/v1/namespaces/dev/configmaps",
            "/api/v1/nodes/node-1",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.example.com",
        ] {
            let d = decide_on(&p, "GET", uri);
            assert_eq!(
                (d.action, d.masking.is_none()),
                (Action::Allow, true),
                "{uri}"
            );
        }

        let p = load(
            r#"default: allow
rules:
  - name: mask-db
    action: mask
    verbs: [get]
    resources: [secrets]
    resourceNames: [db]
  - name: mask-prod-reads
    action: mask
    verbs: [list]
    resources: [configmaps]
    namespaces: ["*"]
  - name: mask-pods
    action: mask
    verbs: [get]
    resources: [pods, pods/status]
"#,
        );
        // A request without a name can return the named object; another name cannot.
        for (method, uri, masked) in [
            ("GET", "/api/v1/namespaces/x/secrets/db", true),
            ("GET", "/api/v1/namespaces/x/secrets", true),
            ("GET", "/api/v1/secrets", true),
            ("GET", "/api/v1/namespaces/x/secrets/other", false),
            // Writes answer with the object: a mask rule on reads covers them.
            ("PATCH", "/api/v1/namespaces/x/secrets/db?dryRun=All", true),
            ("PUT", "/api/v1/namespaces/x/secrets/db", true),
            ("DELETE", "/api/v1/namespaces/x/secrets/db", true),
            ("DELETE", "/api/v1/namespaces/x/secrets", true),
            ("POST", "/api/v1/namespaces/x/secrets", true),
            ("PATCH", "/api/v1/namespaces/x/secrets/other", false),
            // `namespaces: ["*"]` covers a list across all of them.
            ("GET", "/api/v1/configmaps", true),
            ("GET", "/api/v1/namespaces/x/configmaps", true),
            // Subresources that answer with the whole object are masked with it (once,
            // though the rule names one of them itself); others are not.
            ("GET", "/api/v1/namespaces/x/pods/p/status", true),
            (
                "PATCH",
                "/api/v1/namespaces/x/pods/p/ephemeralcontainers",
                true,
            ),
            ("PATCH", "/api/v1/namespaces/x/pods/p/resize", true),
            ("GET", "/api/v1/namespaces/x/secrets/db/status", true),
            ("GET", "/api/v1/namespaces/x/pods/p/log", false),
            ("POST", "/api/v1/namespaces/x/pods/p/eviction", false),
        ] {
            let d = decide_on(&p, method, uri);
            assert_eq!(d.masking.is_some(), masked, "{method} {uri}");
        }
    }

    #[test]
    fn combinations_are_built_once_and_shared() {
        let p = load(POLICY);
        let a = decide_on(&p, "GET", "/apis/apps/v1/namespaces/prod/deployments");
        let b = decide_on(&p, "LIST", "/apis/apps/v1/namespaces/prod/statefulsets");
        let c = decide_on(&p, "GET", "/api/v1/namespaces/dev/secrets");
        let d = decide_on(&p, "GET", "/api/v1/namespaces/dev/secrets/x");
        let (a, c, d) = (a.masking.unwrap(), c.masking.unwrap(), d.masking.unwrap());
        assert!(b.masking.is_none_or(|b| Arc::ptr_eq(&a, &b)));
        assert!(
            Arc::ptr_eq(&c, &d),
            "a single rule's masker is compiled at load"
        );
        let again = decide_on(&p, "GET", "/apis/apps/v1/namespaces/prod/deployments");
        assert!(
            Arc::ptr_eq(&a, &again.masking.unwrap()),
            "a combination is cached"
        );
    }

    #[test]
    fn rule_settings_override_and_extend_the_top_level() {
        use crate::masking::objects::{MaskReport, PLACEHOLDER_TEXT, Target};
        let p = load(POLICY);
        let pod_env = serde_json::json!({"kind": "Deployment", "spec": {"x": "hunter2", "template": {"spec": {"containers": [{"name": "c", "env": [
            {"name": "DB_PASSWORD", "value": "p"}, {"name": "API_TOKEN", "value": "t"}]}]}}}});
        let target = Target {
            group: "apps",
            resource: "deployments",
        };
        // mask-workloads: envNames [TOKEN] replaces the top level's [PASSWORD]; its paths add.
        let m = decide_on(&p, "GET", "/apis/apps/v1/namespaces/dev/deployments/d")
            .masking
            .unwrap();
        let mut v = pod_env.clone();
        m.mask_value(target, &mut v, &mut MaskReport::default());
        let env = &v["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(
            (env[0]["value"].as_str(), env[1]["value"].as_str()),
            (Some("p"), Some(PLACEHOLDER_TEXT))
        );
        assert_eq!(v["spec"]["x"], PLACEHOLDER_TEXT);
        // In prod the prod rule (top-level envNames) joins: both are masked.
        let m = decide_on(&p, "GET", "/apis/apps/v1/namespaces/prod/deployments/d")
            .masking
            .unwrap();
        let mut v = pod_env;
        let mut report = MaskReport::default();
        m.mask_value(target, &mut v, &mut report);
        let env = &v["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(
            (env[0]["value"].as_str(), env[1]["value"].as_str()),
            (Some(PLACEHOLDER_TEXT), Some(PLACEHOLDER_TEXT))
        );
        let by_rule: Vec<(String, u32)> = report
            .counts
            .iter()
            .map(|c| (c.rule.to_string(), c.count))
            .collect();
        assert!(
            by_rule.contains(&("mask-everything-in-prod".to_owned(), 1)),
            "{by_rule:?}"
        );
    }

    #[test]
    fn invalid_masking_is_a_load_error_with_file_and_line() {
        for (body, want) in [
            (
                "default: allow\nmasking:\n  paths:\n    - resources: [configmaps]\n      fields: [data.password]\n",
                "policy.yaml:7:16: masking.paths[0].fields[0]: malformed field path 'data.password': it must start with '.'",
            ),
            (
                "default: allow\nrules:\n  - name: m\n    action: mask\n    verbs: [get]\n    resources: [secrets]\n    masking:\n      maxResponseBytes: 5000000\n",
                "policy.yaml:10:25: rules[0].masking.maxResponseBytes: 'maxResponseBytes' is a bound for the whole gateway",
            ),
            (
                "default: allow\nrules:\n  - name: a\n    action: allow\n    verbs: [get]\n    resources: [secrets]\n    masking: {envNames: [X]}\n",
                "policy.yaml:9:14: rules[0].masking: masking settings apply to rules with action: mask, not allow",
            ),
            (
                "default: allow\nrules:\n  - name: m\n    action: mask\n    message: hi\n    verbs: [get]\n    resources: [secrets]\n",
                "policy.yaml:7:14: rules[0].message: a message is shown when a rule denies",
            ),
            (
                "default: mask\n",
                "policy.yaml:3:10: default: default is allow or deny",
            ),
            (
                "default: allow\nmasking: {maxWatchEventBytes: 10}\n",
                "policy.yaml:4:31: masking.maxWatchEventBytes: 10 is too small",
            ),
            (
                "default: allow\nmasking: {envName: [X]}\n",
                "policy.yaml:4:11: masking: unknown field 'envName'",
            ),
        ] {
            let text = format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}");
            let err = Policy::from_yaml(&text, "policy.yaml")
                .expect_err(body)
                .to_string();
            assert!(
                err.starts_with(want),
                "error\n  {err}\nwanted\n  {want}\nfor\n{text}"
            );
        }
    }
}
