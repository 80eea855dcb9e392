//! The policy decision: policy as data plus one pure function, [`decide`].
//!
//! # Policy file format
//!
//! A policy is one YAML document in the vocabulary of Kubernetes RBAC. Unknown keys are
//! errors, and every error names the file, the YAML path and, where known, the line and
//! column (`policy.yaml:14:7: rules[2].verbs[0]: unknown verb 'remove' ...`).
//!
//! ```yaml
//! apiVersion: chaperone.dev/v1alpha1   # required, exactly this
//! kind: Policy                         # required, exactly this
//! default: allow                       # required: allow | deny, when no rule matches
//! identity:                            # optional guards, checked before any rule
//!   denyInvalidTokens: true            # deny a bearer token that was not accepted
//!   denyServiceAccountMismatch: true   # deny a ServiceAccount token of another pod
//! masking:                             # optional; defaults of every mask rule (see Masking)
//!   secrets: true                      # Secret data/stringData values (default true)
//!   envNames: [PASSWORD, TOKEN]        # env var name parts, any case (default: a list)
//!   paths:                             # fields masked per API group and resource
//!     - apiGroups: [""]                # optional; "" = core group; absent or "*" = any
//!       resources: [configmaps]        # required; "*" = any
//!       fields: [.data.password, '.data["tls.key"]', ".spec.users[*].password"]
//!   detectors: {}                      # credential detectors over every other string
//!   maxResponseBytes: 134217728        # top level only: largest body masked (decompressed)
//!   maxWatchEventBytes: 16777216       # top level only: largest watch event masked
//! rules:                               # optional; evaluated in order, first match wins
//!   - name: protect-namespaces         # required, unique within the policy
//!     action: deny                     # required: allow | deny | mask | approve
//!     message: agents may not delete namespaces   # optional; shown to the client
//!     verbs: [delete, deletecollection]           # required, non-empty; "*" = any verb
//!     apiGroups: [""]                  # optional; "" = core group; absent or "*" = any
//!     resources: [namespaces]          # "pods", "pods/exec", "pods/*", "*/exec", "*"
//!     namespaces: []                   # optional; absent/empty = any, incl. cluster scope
//!     resourceNames: []                # optional; absent/empty = any name
//!     workloads:                       # optional; who is calling, from the kernel
//!       namespaces: [ai-agents]        # the calling pod's namespace
//!       serviceAccounts: [ai-agents/cursor, "ops/*"]   # "namespace/name" or "namespace/*"
//!       pods: [cursor-0, "batch-*"]    # pod name; trailing "*" = prefix
//!       labels: {app: agent}           # every pair must be on the pod
//!   - name: unidentified
//!     action: deny
//!     verbs: ["*"]
//!     resources: ["*"]
//!     workloads: {unknown: true}       # only requests whose pod could not be identified
//!   - name: health
//!     action: allow
//!     verbs: [get]
//!     nonResourceURLs: ["/healthz", "/version", "/apis/*"]   # trailing "*" = prefix
//!     principals:                      # optional; the verified bearer token
//!       kinds: [anonymous, oidc, serviceAccount, user, invalid]
//!       subjects: [alice@example.com, "system:serviceaccount:ci:*"]  # trailing "*" = prefix
//!       groups: [sre]                  # any one of these groups
//!   - name: no-privileged-pods
//!     action: deny
//!     verbs: [create, update, patch]
//!     resources: [pods, deployments]
//!     when:                            # optional CEL conditions, all must hold
//!       - podSpec.containers.exists(c, has(c.securityContext) && has(c.securityContext.privileged) && c.securityContext.privileged)
//!   - name: no-rm-rf
//!     action: deny
//!     verbs: [create, get]
//!     resources: [pods/exec]
//!     exec: {commands: ["rm -rf *"]}   # optional: command, programs, stdin/tty, container
//!   - name: mask-reads
//!     action: mask                     # allow, and mask what the agent receives
//!     verbs: ["*"]
//!     resources: [secrets, configmaps, pods, deployments]
//!     masking:                         # optional; this rule's settings over the top level's
//!       envNames: [PASSWORD, DSN]
//!   - name: scale-prod
//!     action: approve                  # forward only once a person approves (see Approval)
//!     verbs: [patch, update]
//!     apiGroups: [apps]
//!     resources: [deployments, deployments/scale]
//!     namespaces: [prod]
//!     approval:                        # required with action: approve, refused otherwise
//!       approvers: {groups: [sre], users: [alice@example.com]}   # required, not empty
//!       timeout: 5m                    # default 5m, at most 24h; silence = denied
//!       grant: {for: 15m, scope: identical}   # or `once` (default); scope: identical | rule
//!       mode: hold                     # hold (default) | async
//! ```
//!
//! A rule has either `resources` (a resource rule) or `nonResourceURLs` (a non-resource
//! rule), never both; `apiGroups`, `namespaces` and `resourceNames` only apply to resource
//! rules. `workloads` and `principals` apply to both. Lists may not be empty where an
//! empty list could never match (`apiGroups`, and every list under `workloads` and
//! `principals`): omit the key instead.
//!
//! # Matching
//!
//! A rule matches a request when every field it sets matches, as in RBAC:
//!
//! * `verbs`: the request's Kubernetes verb. Resource rules take `get list watch create
//!   update patch delete deletecollection proxy impersonate`; non-resource rules take the
//!   lowercase HTTP method: `get head post put patch delete options`. `"*"` matches any
//!   verb, including ones not listed here.
//! * `apiGroups`: the request's API group (`""` is the core group, `apps`, ...). An explicit
//!   empty list is an error: write `[""]` for the core group or omit the key for any group.
//! * `resources`: `pods` matches requests on pods only, **not** on a subresource such as
//!   `pods/exec`; `pods/exec` matches that subresource; `pods/*` matches every subresource
//!   of pods (but not pods itself); `*/exec` matches the `exec` subresource of any resource;
//!   `*/*` any subresource; `*` everything.
//! * `namespaces`: the request's namespace. A rule that lists namespaces never matches a
//!   cluster-scoped request; `"*"` in the list means "any namespace, but not cluster scope".
//!   Requests on a namespace object itself (`/api/v1/namespaces/prod`) are in namespace
//!   `prod`, as in RBAC.
//! * `resourceNames`: the object name, from the path or, for a list/watch, from a
//!   `fieldSelector=metadata.name=<name>`. A rule with `resourceNames` never matches a
//!   request without a name (a list, a create).
//! * `nonResourceURLs`: the decoded URL path, exactly, or by prefix when the entry ends in
//!   `*` (`/apis/*`); `"*"` alone matches every non-resource URL.
//! * `workloads`: the pod the kernel attributed the connection to (never anything the pod
//!   sends). Every key it sets must match: `namespaces` (`"*"` = any), `serviceAccounts`
//!   (`namespace/name`, or `namespace/*` for every service account of a namespace), `pods`
//!   (exact, or a prefix ending in `*`) and `labels` (every listed pair, as a
//!   `matchLabels`). A rule with `workloads` never matches a request whose pod is unknown
//!   (not found yet, or not a pod at all); `workloads: {}` matches any identified pod.
//!   `workloads: {unknown: true}` matches **only** unidentified callers, e.g. to deny them
//!   everything; it cannot be combined with the other keys.
//! * `principals`: the bearer token, as verified by the gateway (no token = `anonymous`).
//!   `kinds`: `anonymous`, `oidc` (a verified OIDC ID token), `serviceAccount` (a
//!   ServiceAccount token the API server authenticated), `user` (another token the API
//!   server authenticated), `invalid` (a token that was presented but not accepted);
//!   `subjects`: the user name (`system:serviceaccount:<ns>:<name>`, or the OIDC user name
//!   with its prefix), exactly or by a prefix ending in `*`; `groups`: matches when the
//!   principal is in at least one of them.
//!
//! Resource rules only match resource requests and non-resource rules only non-resource
//! requests. When no rule matches, `default` applies.
//!
//! # Identity guards
//!
//! The top-level `identity` guards run before the rules, so no rule can allow what they
//! deny. `denyInvalidTokens` denies a request whose bearer token was presented but not
//! accepted (bad signature, expired, unknown issuer, malformed header; the reason is in
//! the denial); `denyServiceAccountMismatch` denies a request carrying the ServiceAccount
//! token of a different service account than the pod the kernel attributed it to (a stolen
//! or borrowed token). The decision then names the guard, e.g.
//! `identity.denyInvalidTokens`, where a rule decision names the rule; rule names starting
//! with `identity.` are reserved for this.
//!
//! # Content conditions (`when`)
//!
//! A rule's `when` is a list of CEL expressions; the rule matches only when its other fields
//! match **and** every expression is true. Expressions are compiled when the policy loads (a
//! syntax error, an unknown variable or a limit exceeded is a load error with file:line) and
//! evaluated only for requests that reach the rule in first-match order. They read the
//! variable names of a Kubernetes ValidatingAdmissionPolicy, plus the caller:
//!
//! * `object`: what the API server would store. For a create or update, the request body
//!   (protobuf and YAML bodies are transcoded, and the JSON is what is forwarded, so the API
//!   server reads the object the rule read: YAML is read by YAML 1.2's rules, where `yes` and
//!   `on` are strings and `<<` is an ordinary key, not by the YAML 1.1 rules the API server
//!   would apply to the original). For a patch (JSON, merge, strategic) or a
//!   server-side apply, the result of the same request sent upstream with `dryRun=All` with
//!   the gateway's credential; the gateway sends that dry run only when a rule that reads
//!   `object` could match the request, so other requests pay nothing. `null` for a get,
//!   list, watch or delete.
//! * `oldObject`: the stored object an update, patch or delete applies to (read upstream, on
//!   the same terms); `null` for a create or when there is none.
//! * `podSpec`: the pod template's `spec` of `object` whatever its kind (`Pod`,
//!   `Deployment`, `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`,
//!   `ReplicationController`, `PodTemplate`); `null` for other kinds. On a create or update
//!   of one of these resources the kind is the URL's, not the body's: the API server reads a
//!   body without `kind` as the resource it was sent to (and refuses another kind).
//!   A JSON body with a key twice in one object is refused (400): the API server would
//!   merge the repeats where a JSON parser keeps the last one.
//! * `request`: `verb`, `operation` (`CREATE`, `UPDATE`, `DELETE` or `""`),
//!   `resource.{group,version,resource}`, `subResource`, `namespace`, `name`, `path`,
//!   `dryRun` (bool: the query's `dryRun`, or for a delete with a body its
//!   `DeleteOptions`, which the API server then reads instead), `userInfo.{username,groups}`
//!   (the verified principal).
//! * `workload`: the calling pod, from the kernel: `known`, `namespace`, `name`,
//!   `serviceAccount`, `labels`.
//! * `principal`: the verified bearer token: `kind`, `username`, `groups`.
//!
//! A decision that read the stored object (as `oldObject`, or as the base of a dry run)
//! judged one version of it, and the API server applies the real request a moment later to
//! whatever is stored then. So the gateway sends the request bound to the version it read,
//! with the API server's own preconditions on its `resourceVersion` and `uid`: a JSON patch
//! gets last operations setting `/metadata/resourceVersion` and `/metadata/uid`, a merge,
//! strategic-merge or apply patch and an update carry them in `metadata`, and a delete in
//! `DeleteOptions.preconditions` (a delete sent without a body gets one, holding the options
//! of its query, which the API server reads only when there is no body). Every other value
//! of the body keeps the text the dry run judged. If another write lands in between, or the
//! object is deleted (an apply would otherwise create it again from its body alone), the API
//! server answers 409 Conflict, as to any client whose view is stale, and nothing is applied
//! that no decision covered; the client reads again and retries (client-side `kubectl apply`
//! does so itself; `kubectl patch`, `edit`, `delete` and `apply --server-side` report the
//! conflict). A request that already names the version read goes as sent; one that names
//! another version is answered 409 by the gateway, and one whose body cannot carry the
//! precondition (not read whole, not JSON-shaped) 400. The recording holds the request as it
//! was sent, precondition included. A request held for approval is decided again when it is
//! approved, under the policy in force then (a rule added meanwhile, such as a change
//! freeze, denies it; another rule asking for approval, or changed masking, answers 409),
//! and judged again on what is stored then (also when the first decision found no object),
//! and bound to that: a change made while it waited is denied if a rule now denies it, and answered 409
//! if another rule now asks for approval or the masking of its answer changed. A body that
//! cannot be bound is refused before it is held. An apply judged as a create (the object
//! did not exist) cannot be bound: if the object is created in between, the apply changes
//! it. When the API server refuses a dry run, the denial names its reason and the fields its
//! causes name, not its message, which can quote stored values. A server-side apply's
//! dry run is sent with `force=true`, so that it shows what the apply would store even where
//! it would conflict (the real apply, unforced, then stores exactly that or nothing). A
//! proxied request (`pods/proxy`, `services/proxy`) is never tried as a dry run: the program
//! it reaches ignores `dryRun` and acts, so a rule that reads its `object` cannot be
//! evaluated and denies.
//!
//! A field that is not set is an error to read, as in Kubernetes: test it with `has()` first
//! (`has(c.securityContext) && c.securityContext.privileged`). A condition that cannot be
//! evaluated (an error, a result that is not a boolean, content that could not be read or
//! dry-run, or an estimated cost over the limit) **denies** the request, naming the rule and
//! the reason, and counts in `chaperone_policy_condition_failures_total`.
//!
//! Evaluation is bounded before it runs: an expression is at most 4096 bytes, nests at most
//! 32 brackets and 3 comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) deep,
//! and its cost (every node 1, a comprehension's body times the number of values `n` in the
//! objects it reads; a loop over a part of the enclosing loop's element, such as
//! `c.env` inside `podSpec.containers.exists(c, ...)`, counted once for all elements) must
//! stay under 1,000,000, the API server's per-call limit.
//!
//! # Exec selectors (`exec`)
//!
//! A rule on `pods/exec` or `pods/attach` may carry `exec`, which matches the request's
//! query: `commands` (shell-style globs, `*` any run of characters and `?` one, over the
//! space-joined argv, over the same with argv[0] reduced to its base name, and over the
//! script of `sh|bash|dash|zsh|ash|ksh|busybox -c SCRIPT`), `programs` (globs over argv[0]'s
//! base name), `commandRegexes` (regexes, RE2 syntax, over the same strings as `commands`),
//! `interactive` (`true`: only with stdin or a tty; `false`: only without) and `containers`
//! (globs over the container name). The query is read as the API server reads it: of
//! `container`, `stdin` and `tty` the first value counts (`stdin=true&stdin=false` is an
//! interactive session), and any value but `0` or `false` is true. `commands`, `programs`
//! and `commandRegexes` are alternatives (any one matching is enough); `interactive` and
//! `containers` must hold as well. An attach runs no command, so a rule with command
//! matchers never matches it. A command line assembled at run time (a script that builds
//! `rm` from pieces) is not seen by any pattern: deny interactive sessions to rule that out.
//!
//! An `allow` or `mask` rule's `exec` may also carry `stdinLines: {deny: [regex...],
//! message}`: line rules over what an allowed session types on stdin. A matching line closes
//! the stream with the reason on the client's stderr and error channel; see "Stdin line
//! rules" below, which also says why this is best effort.
//!
//! # Masking
//!
//! A rule with `action: mask` allows the request and masks the response the agent
//! receives (and the recording). Rules are walked in order: the first matching `allow` or
//! `deny` rule decides, as without masking; every `mask` rule that matches before it (or
//! before the default, when no rule decides) adds its masking, and masking rules
//! accumulate. A request allowed with masking is decided `mask` (the recording's
//! `decision`; the `masked` column names the rules); a denied request stays denied,
//! whatever mask rules matched before the deny. `default` is `allow` or `deny`: to mask
//! everything that is allowed, put a `mask` rule with `verbs: ["*"]` and
//! `resources: ["*"]` first.
//!
//! A mask rule covers every answer that can carry the objects it names, which is wider
//! than an allow or deny rule of the same shape: a mask rule with any of `get`, `list`
//! or `watch` also masks the others and the writes that answer with the object (`create`,
//! `update`, `patch`, `delete`, `deletecollection`, dry runs included); one with
//! `namespaces` also masks lists, watches and collection deletes across all namespaces
//! (which return those namespaces' objects among the others, all masked alike; lists of
//! cluster-scoped resources look the same to the gateway and are masked too); one with
//! `resourceNames` also masks requests without a name (lists, watches, creates); one on a
//! resource also masks its `status`, `ephemeralcontainers` and `resize` subresources, which
//! answer with the whole object (a pod's env values in `pods/status`). Allow
//! and deny rules keep RBAC's reading: a deny rule for namespace `prod` does not deny
//! `kubectl get secrets -A`, so to keep a resource from being read at all, deny it
//! without `namespaces`.
//!
//! A mask rule's settings are the top-level `masking` with the rule's own `masking` over
//! it: `secrets`, `envNames` and `detectors` set in the rule replace the top level's;
//! `paths` add to them. When several mask rules apply, everything any of them asks for is
//! masked. `maxResponseBytes` and `maxWatchEventBytes` belong to the top level only and
//! lie between 1024 bytes and 1 GiB (a masked answer is held whole in memory);
//! `masking` on an allow or deny rule and `message` on a mask rule are errors.
//!
//! Masking applies to every JSON object the agent reads (get, list, `Table`, watch, and
//! the objects that create, update and patch return):
//!
//! * Secret `data` values become `KiptYXNrZWQgYnkgY2hhcGVyb25lKio=`, the base64 of
//!   `**masked by chaperone**` (so `base64 -d` and client libraries decode it),
//!   `stringData` values `**masked by chaperone**`; keys, `type` and metadata stay.
//! * The `kubectl.kubernetes.io/last-applied-configuration` annotation is masked by the
//!   same settings and stays JSON (replaced whole if it is not JSON).
//! * Env `value`s whose name contains an `envNames` entry (any case; default `PASSWORD`,
//!   `PASSWD`, `SECRET`, `TOKEN`, `KEY`, `CREDENTIAL`, `PRIVATE`, `AUTH`, `CONN_STR`,
//!   `CONNECTION_STRING`, `DSN`; `[]` for none), in `containers`, `initContainers` and
//!   `ephemeralContainers` of pods and of every pod template: `spec.template.spec`
//!   (Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job),
//!   `spec.jobTemplate.spec.template.spec` (CronJob), `template.spec` (PodTemplate) and
//!   `data.spec.template.spec` (ControllerRevision, the history `kubectl rollout history`
//!   reads).
//! * `paths` fields: `.a.b`, `.a["key.with.dots"]`, `.a[0]`, and `.a[*]` or `.a.*` for
//!   every element or key; the value and everything under it become
//!   `**masked by chaperone**`.
//! * The credential detectors run over every other string value, `Table` cells included.
//!   A Table does not say which field each printer column shows, so for a resource that
//!   `paths` apply to the gateway asks the API server for the objects instead of a Table
//!   (`kubectl get` then prints names and ages) and masks every cell of a Table it gets.
//!
//! A client that accepts protobuf (client-go's typed clients send
//! `application/vnd.kubernetes.protobuf, application/json`) gets the masked JSON: for a
//! masked request the gateway asks the API server for JSON only (protobuf entries of `Accept`
//! become JSON with the same parameters, so `as=Table` stays), and clients decode by the
//! response's `Content-Type`. A response that must be masked and cannot be (not JSON: text,
//! HTML or binary with a body, from a proxy subresource, an aggregated API or an error page,
//! except pod logs, which are masked line by line; protobuf, YAML or CBOR sent although the
//! gateway asked for JSON; over `maxResponseBytes`) is refused with a
//! `Status` 500 and counted in `chaperone_masking_failures_total`; a watch event that
//! cannot be masked or is over `maxWatchEventBytes` ends the watch with an `ERROR` event.
//! A JSON patch (`kubectl patch --type=json`) on a masked request may only `add`,
//! `remove` and `replace`: `copy` and `move` could put a masked value where masking does
//! not look (a Secret's `data` into an annotation) and `test` could confirm a guessed
//! one, so such a patch, or one too large to read, is refused with 403. For the same reason
//! a server-side apply on a masked request must be forced (`force=true`, `kubectl apply
//! --server-side --force-conflicts`): unforced, the API server's 409 for a field another
//! manager owns with a different value, or its 200 for the same value, would confirm a
//! guess. An unforced apply there is refused with 403. Masked answers carry no
//! `metadata.managedFields` either: a write, or its dry run, that sets a field another
//! manager owns leaves it co-owned when the value is the same and takes it over when it is
//! not, which the field ownership in the answer would show. An error `Status` in a masked
//! answer keeps the first line of its `message` (and of its causes' messages): the API
//! server prints the objects a refused update differs in after it, a pod's env values
//! included. A masked dry-run write's answer has no `metadata.generation` either: the API
//! server bumps it when the write would change the spec. A real write's answer still shows
//! by its `generation` and `resourceVersion` whether it changed anything (at the cost of
//! writing the guess): deny writes that set what a rule masks (the baseline policy denies
//! Secret writes).
//!
//! # Approval (`approve`)
//!
//! A rule with `action: approve` lets a request through only once a person approves it.
//! It decides like `allow` and `deny` (first match wins; `mask` rules before it still
//! apply once it is approved) and needs an `approval` block:
//!
//! * `approvers`: `groups` and `users` who may decide (an approver must also hold the
//!   `approve` verb on `accessrequests.chaperone.dev`, checked by the approvals API; see
//!   the approver's guide). Required, and must name someone.
//! * `timeout`: how long a decision may take (`30s`, `5m`, `1h`; default `5m`, at most
//!   `24h`). Nobody deciding in time is a denial: the client gets a 403 `Status` saying the
//!   request expired.
//! * `grant`: what an approval lets through. `once` (the default): this request only. When
//!   identical requests waited on one AccessRequest together, one goes through and the
//!   others are refused (403; sending one again asks anew); an approval an async retry has
//!   not used lapses as long after the decision as the rule's `timeout`.
//!   `{for: 15m, scope: identical}`: for 15 minutes, the identical request (same method,
//!   path, `Content-Type` and body, held by the same rule) from the same workload and
//!   principal passes without asking again; `scope: rule`: any request this rule matches
//!   from the same workload and principal. At most 7 days.
//! * `mode`: `hold` (the default) keeps the agent's request open and sends **nothing**
//!   upstream until the decision, then forwards it (approved) or answers 403 (denied, with
//!   the approver's comment; expired); 503 if the gateway stops meanwhile (the retry waits
//!   on the same AccessRequest), 429 if the workload already has
//!   `approval.maxWaitingPerWorkload` requests held. `async` answers at once with a 403 `Status` naming
//!   the AccessRequest and the command that approves it (`kubectl chaperone approve
//!   NAME`); a retry of the same request passes once it is approved.
//!
//! Each held request is an `AccessRequest` (`accessrequests.chaperone.dev`) in the
//! gateway's namespace, created with the gateway's credential; an identical request from
//! the same workload reuses the pending one. A request that cannot be held (the
//! AccessRequest cannot be created, too many pending or held for the workload, approvals not
//! configured on the gateway) is refused, never forwarded; so is one whose body is larger
//! than the gateway reads whole (`limits.maxInspectedBodyBytes`: what was approved could not
//! be told from what would be forwarded). Approvals and grants are tied to the calling pod
//! (namespace, name and UID: a pod deleted and created again under the same name asks
//! anew), to the verified principal behind its token (the one the approver was shown; the
//! same request with another principal's token asks anew) and to the rule that asked (after
//! a policy reload, a request another rule holds asks its own approvers). Callers the gateway could not identify all count as one workload, and their
//! requests are held as `once` whatever the rule's `grant` (a window would open for every
//! unidentified caller). Deny `workloads: {unknown: true}` before approve rules where that
//! matters. `approval`
//! on another action and `message` on an approve rule are errors, and `approve` is no
//! `default`.
//!
//! A built-in rule, `builtin.protect-approvals`, runs before the identity guards and every
//! rule and cannot be removed: it denies any write (create, update, patch, delete,
//! deletecollection, any subresource such as `accessrequests/status`) to `chaperone.dev`
//! resources, and any request through the API server's service proxy to the
//! `chaperone-approvals` Service (`/api/v1/namespaces/*/services/[https:]chaperone-approvals[:port]/proxy/...`).
//! The approvals API itself refuses connections from intercepted pods. Rule names starting
//! with `builtin.` are reserved.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{BuildHasherDefault, Hasher},
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use crate::{
    identity::{
        WorkloadIdentity,
        principal::{Principal, PrincipalKind},
    },
    masking::objects::Masker,
    request::{ExecRequest, RequestInfo, Verb},
};

mod approve;
mod cel;
mod compile;
#[cfg(test)]
mod content_tests;
mod exec;
pub mod fixture;
mod index;
mod load;
mod masking;
mod matching;
mod model;
pub mod reload;
pub mod stdin;
#[cfg(test)]
mod tests;

pub use approve::{
    APPROVALS_SERVICE, Approval, ApprovalMode, BUILTIN_PROTECT_APPROVALS, DEFAULT_TIMEOUT,
    GrantSpec, MAX_GRANT, PROTECTED_GROUP,
};
pub use cel::{COST_LIMIT, Content};
use cel::{Condition, Variables};
use compile::*;
use exec::{CommandLines, ExecCond};
use index::*;
pub use load::PolicyError;
use load::*;
use masking::*;
use matching::*;
use model::*;
pub use stdin::{LineViolation, StdinLineRules, StdinLineWatcher};

/// The `apiVersion` a policy document must declare.
pub const API_VERSION: &str = "chaperone.dev/v1alpha1";
/// The `kind` a policy document must declare.
pub const KIND: &str = "Policy";
/// Largest policy file [`Policy::from_file`] reads.
pub const MAX_POLICY_BYTES: u64 = 8 * 1024 * 1024;
/// [`Decision::rule`] when the `identity.denyInvalidTokens` guard denied the request.
pub const GUARD_INVALID_TOKENS: &str = "identity.denyInvalidTokens";
/// [`Decision::rule`] when the `identity.denyServiceAccountMismatch` guard denied it.
pub const GUARD_SERVICE_ACCOUNT_MISMATCH: &str = "identity.denyServiceAccountMismatch";
/// Rule names with this prefix are reserved for the identity guards.
const GUARD_PREFIX: &str = "identity.";

/// Verbs a resource rule may list (besides `*`).
const RESOURCE_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "impersonate",
];
/// Verbs (lowercase HTTP methods) a non-resource rule may list (besides `*`).
const NON_RESOURCE_VERBS: &[&str] = &["get", "head", "post", "put", "patch", "delete", "options"];

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Forward the request.
    Allow,
    /// Refuse it with a Kubernetes `Status` 403 (the default of an empty compiled policy,
    /// so a policy that failed to build fails closed).
    #[default]
    Deny,
    /// Forward the request and mask the response (a rule's `action: mask`; the decision
    /// of a request allowed with masking).
    Mask,
    /// Forward the request only once a person approves it (a rule's `action: approve`;
    /// the decision carries the rule's [`Approval`]).
    Approve,
}

impl Action {
    /// The action as policy files and recordings spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Mask => "mask",
            Action::Approve => "approve",
        }
    }

    /// Parses what [`Action::as_str`] wrote.
    pub fn parse(text: &str) -> Option<Action> {
        [Action::Allow, Action::Deny, Action::Mask, Action::Approve]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`decide`]: the action, the rule (or identity guard) that chose it and,
/// for [`Action::Mask`], the masking to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// Name of the matching rule, or of the identity guard that denied the request
    /// ([`GUARD_INVALID_TOKENS`], [`GUARD_SERVICE_ACCOUNT_MISMATCH`]); `None` when the
    /// policy default applied.
    pub rule: Option<Arc<str>>,
    /// The matching rule's message for the client, if it has one; for a guard, why it
    /// denied the request.
    pub message: Option<Arc<str>>,
    /// For [`Action::Mask`]: the masking of every `mask` rule that matched before the
    /// deciding rule, compiled once and shared (its [`Masker::rules`] name them); for
    /// [`Action::Approve`], the masking that applies once approved.
    pub masking: Option<Arc<Masker>>,
    /// For an allowed exec or attach session: the `exec.stdinLines` of the deciding rule
    /// and of every `mask` rule that matched, checked against each line typed on stdin.
    pub stdin_lines: Option<Arc<StdinLineRules>>,
    /// For [`Action::Approve`]: who approves and how.
    pub approval: Option<Arc<Approval>>,
}

impl Decision {
    /// Whether the request may go ahead without anyone's approval.
    pub fn is_allowed(&self) -> bool {
        matches!(self.action, Action::Allow | Action::Mask)
    }

    /// Every rule that matched: the `mask` rules that apply, then the deciding rule.
    pub fn matched_rules(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .masking
            .as_ref()
            .map(|m| m.rules().to_vec())
            .unwrap_or_default();
        out.extend(self.rule.clone());
        out
    }

    /// A sentence for the client and the recording, e.g. `denied by Chaperone policy rule
    /// "protect-namespaces": agents may not delete namespaces`.
    pub fn reason(&self) -> String {
        let verb = match self.action {
            Action::Allow => "allowed",
            Action::Deny => "denied",
            Action::Mask => "allowed with masking",
            Action::Approve => "held for approval",
        };
        // Rule names cannot carry the guard or built-in prefixes, so this names guards
        // and built-in rules only.
        let what = match &self.rule {
            Some(rule) if rule.starts_with(GUARD_PREFIX) => "guard",
            Some(rule) if rule.starts_with(approve::BUILTIN_PREFIX) => "built-in rule",
            _ => "rule",
        };
        match (&self.rule, &self.message) {
            (Some(rule), Some(message)) => {
                format!("{verb} by Chaperone policy {what} \"{rule}\": {message}")
            }
            (Some(rule), None) => format!("{verb} by Chaperone policy {what} \"{rule}\""),
            (None, _) => format!(
                "{verb} by Chaperone policy: no rule matched and the default action is {}",
                // The default is allow or deny; mask comes from the mask rules.
                if self.action == Action::Mask {
                    Action::Allow
                } else {
                    self.action
                }
            ),
        }
    }
}

/// Everything a decision may depend on: what is asked, and who asks. Build it with
/// [`RequestContext::new`] and the `with_*` methods, so new inputs do not break callers.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The request's Kubernetes attributes.
    pub request: &'a RequestInfo,
    /// The workload the kernel attributed the connection to; `None` when there is none
    /// (treated like a workload that is not [`WorkloadIdentity::is_known`]).
    pub workload: Option<&'a WorkloadIdentity>,
    /// The verified principal behind the bearer token; `None` is anonymous.
    pub principal: Option<&'a Principal>,
    /// The object the request would store (CEL `object`).
    pub object: Content<'a>,
    /// The object stored before the request (CEL `oldObject`).
    pub old_object: Content<'a>,
    /// The command, container and flags of an exec or attach request.
    pub exec: Option<&'a ExecRequest>,
    /// Whether the client asked for a dry run (`dryRun=All`).
    pub dry_run: bool,
}

impl<'a> RequestContext<'a> {
    /// A context holding only the request attributes: unknown workload, anonymous.
    pub fn new(request: &'a RequestInfo) -> Self {
        Self {
            request,
            workload: None,
            principal: None,
            object: Content::Absent,
            old_object: Content::Absent,
            exec: None,
            dry_run: false,
        }
    }

    /// Sets the request's content: the object it would store and the one stored before.
    pub fn with_content(mut self, object: Content<'a>, old_object: Content<'a>) -> Self {
        self.object = object;
        self.old_object = old_object;
        self
    }

    /// Sets the exec/attach parameters and the dry-run flag.
    pub fn with_exec(mut self, exec: Option<&'a ExecRequest>, dry_run: bool) -> Self {
        self.exec = exec;
        self.dry_run = dry_run;
        self
    }

    /// Sets the workload; takes `&WorkloadIdentity` or `Option<&WorkloadIdentity>`.
    pub fn with_workload(mut self, workload: impl Into<Option<&'a WorkloadIdentity>>) -> Self {
        self.workload = workload.into();
        self
    }

    /// Sets the principal; takes `&Principal` or `Option<&Principal>`.
    pub fn with_principal(mut self, principal: impl Into<Option<&'a Principal>>) -> Self {
        self.principal = principal.into();
        self
    }
}

/// A compiled policy: cheap to clone and share (one `Arc` inside).
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Compiled>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.inner.source)
            .field("default", &self.inner.default)
            .field(
                "rules",
                &self
                    .inner
                    .rules
                    .iter()
                    .map(|r| &*r.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Policy {
    /// Parses, validates and compiles a policy document; `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str) -> Result<Policy, PolicyError> {
        // serde_norway reads an empty document as null and reports the first missing field,
        // which would hide the real problem.
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(PolicyError::Syntax {
                source_name: source.to_owned(),
                line: None,
                column: None,
                yaml_path: ".".to_owned(),
                message: format!(
                    "empty policy document; expected apiVersion: {API_VERSION}, kind: {KIND}, default and rules"
                ),
            });
        }
        let raw: RawPolicy =
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
                .map_err(|e| syntax_error(source, e))?;
        let compiled = compile(raw, source).map_err(|invalid| {
            let (line, column) = locate(text, &invalid.path).unzip();
            PolicyError::Invalid {
                source_name: source.to_owned(),
                line,
                column,
                yaml_path: render_path(&invalid.path),
                message: invalid.message,
            }
        })?;
        let mut compiled = compiled;
        compiled.digest = reload::digest(text);
        compiled.loaded_at = Some(jiff::Timestamp::now());
        Ok(Policy {
            inner: Arc::new(compiled),
        })
    }

    /// SHA-256 of the policy text, hex (empty for the built-in allow-all policy).
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// When this policy was compiled.
    pub fn loaded_at(&self) -> Option<jiff::Timestamp> {
        self.inner.loaded_at
    }

    /// Reads and compiles a policy file (at most [`MAX_POLICY_BYTES`]).
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = read_policy_file(path)?;
        Policy::from_yaml(&text, &path.display().to_string())
    }

    /// A policy with no rules that allows everything.
    pub fn allow_all() -> Policy {
        let raw = RawPolicy {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            default: Action::Allow,
            identity: None,
            rules: Vec::new(),
            masking: None,
        };
        let compiled = compile(raw, "allowAll");
        Policy {
            inner: Arc::new(compiled.unwrap_or_else(|_| Compiled::empty("allowAll"))),
        }
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.inner.rules.len()
    }

    /// The names of the rules that ask a person to approve (`action: approve`).
    pub fn approve_rules(&self) -> impl Iterator<Item = &str> {
        self.inner
            .rules
            .iter()
            .filter(|r| r.action == Action::Approve)
            .map(|r| &*r.name)
    }

    /// The action when no rule matches.
    pub fn default_action(&self) -> Action {
        self.inner.default
    }

    /// Whether any rule's conditions read `object` or `oldObject`, so that a mutating
    /// request may need its content fetched before the decision.
    pub fn reads_content(&self) -> bool {
        self.inner.reads_content
    }

    /// Where the policy came from (file name or label).
    pub fn source(&self) -> &str {
        &self.inner.source
    }
}

/// Reads a policy file's text, at most [`MAX_POLICY_BYTES`].
pub(crate) fn read_policy_file(path: &Path) -> Result<String, PolicyError> {
    let read_error = |source| PolicyError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    // One byte over the limit tells "exactly at the limit" from "too large" without
    // trusting the file's reported size (a FIFO or /dev/zero has none).
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

impl Compiled {
    /// The line rules of an allowed exec/attach session: those of the `mask` rules that
    /// matched, then the deciding rule's.
    fn stdin_lines(
        &self,
        deciding: Option<&Rule>,
        masks: &MaskHits,
    ) -> Option<Arc<StdinLineRules>> {
        let of = |r: &Rule| r.content.as_ref()?.exec.as_ref()?.stdin_lines.clone();
        let mut parts: Vec<Arc<StdinLineRules>> = masks
            .as_slice()
            .iter()
            .filter_map(|&i| self.rules.get(i as usize))
            .filter_map(of)
            .collect();
        parts.extend(deciding.and_then(of));
        match parts.len() {
            0 | 1 => parts.pop(),
            _ => Some(Arc::new(StdinLineRules::combine(
                parts.iter().map(|p| &**p),
            ))),
        }
    }
}

/// Decides a request: an identity guard's denial, else the first matching rule's action,
/// else the policy default.
pub fn decide(policy: &Policy, ctx: &RequestContext<'_>) -> Decision {
    match evaluate(policy, ctx) {
        Evaluation::Decided(d) | Evaluation::ConditionFailed(d) => d,
        // Content that was not fetched cannot be judged: fail closed.
        Evaluation::NeedsContent { rule, .. } => Decision {
            action: Action::Deny,
            message: Some(Arc::from(
                "its conditions read the request's content, which was not available",
            )),
            rule: Some(rule),
            masking: None,
            stdin_lines: None,
            approval: None,
        },
    }
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evaluation {
    /// The policy decided.
    Decided(Decision),
    /// A rule's `when` condition could not be evaluated (an error, a non-boolean result, a
    /// cost over [`COST_LIMIT`]): the request is denied with the reason (fail closed).
    ConditionFailed(Decision),
    /// A rule's `when` conditions read content still [`Content::Pending`]: fetch it (a dry
    /// run, the stored object) and evaluate again. Only rules that could match get here, so
    /// requests no content rule applies to never pay for a fetch.
    NeedsContent {
        /// The rule that needs it.
        rule: Arc<str>,
        /// CEL `object` is needed.
        object: bool,
        /// CEL `oldObject` is needed.
        old_object: bool,
    },
}

/// Decides a request like [`decide`], but says when content must be fetched first.
pub fn evaluate(policy: &Policy, ctx: &RequestContext<'_>) -> Evaluation {
    let p = &*policy.inner;
    if let Some(denied) = approve::builtin(ctx.request) {
        return Evaluation::Decided(denied);
    }
    if let Some(denied) = p.guards.check(ctx.principal) {
        return Evaluation::Decided(denied);
    }
    let req = ctx.request;
    let mut state = ContentState::new(ctx);
    let found = if req.is_resource_request {
        p.first_resource_match(ctx, &mut state)
    } else {
        p.first_url_match(ctx, &mut state)
    };
    let mut decision = match (found, state.stop) {
        (Some(rule), Some(Stop::Needs { object, old_object })) => {
            return Evaluation::NeedsContent {
                rule: rule.name.clone(),
                object,
                old_object,
            };
        }
        (Some(rule), Some(Stop::Failed(why))) => {
            return Evaluation::ConditionFailed(Decision {
                action: Action::Deny,
                rule: Some(rule.name.clone()),
                message: Some(Arc::from(why)),
                masking: None,
                stdin_lines: None,
                approval: None,
            });
        }
        (Some(rule), None) => Decision {
            action: rule.action,
            rule: Some(rule.name.clone()),
            message: rule.message.clone(),
            masking: None,
            stdin_lines: None,
            approval: rule.approval.clone(),
        },
        (None, _) => Decision {
            action: p.default,
            rule: None,
            message: None,
            masking: None,
            stdin_lines: None,
            approval: None,
        },
    };
    // Masking only matters to a request that goes ahead; a denial stays a denial. An
    // approved request is masked like an allowed one.
    if matches!(decision.action, Action::Allow | Action::Approve)
        && let Some(masker) = p.masking.masker(&state.masks)
    {
        if decision.action == Action::Allow {
            decision.action = Action::Mask;
        }
        decision.masking = Some(masker);
    }
    if decision.is_allowed() && ctx.exec.is_some() {
        decision.stdin_lines = p.stdin_lines(found, &state.masks);
    }
    Evaluation::Decided(decision)
}
