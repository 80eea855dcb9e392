//! Asking the API server who a token belongs to (`authentication.k8s.io/v1` TokenReview).
//!
//! ServiceAccount tokens (bound projected tokens and legacy secrets alike) can only be
//! validated by the API server that issued them: it checks the signature, and that the bound
//! pod/secret still exists. The gateway's own credential needs `create` on `tokenreviews`
//! (the `system:auth-delegator` ClusterRole).

use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};

use super::TokenError;

/// What the API server said about a token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReviewResult {
    /// Whether the token authenticated.
    pub authenticated: bool,
    /// The user name (`system:serviceaccount:<ns>:<name>` for ServiceAccount tokens).
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The user's UID (ServiceAccount tokens: the service account's UID), if given.
    pub uid: Option<String>,
    /// The API server's reason when the token did not authenticate.
    pub error: Option<String>,
}

/// Reviews bearer tokens; implemented against the API server and by a fake for tests.
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews one token. `Err` means the review could not be made (API server unreachable,
    /// forbidden), not that the token is bad.
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewResult, TokenError>>;
}

/// TokenReview through kube-rs.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl KubeTokenReviewer {
    /// A reviewer that posts TokenReviews with `audiences` (empty: the API server's own).
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self { client, audiences }
    }

    /// The TokenReview object sent for `token`.
    pub fn request(token: &str, audiences: &[String]) -> TokenReview {
        TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
            },
            status: None,
        }
    }

    /// Reads the answer out of a returned TokenReview.
    pub fn result(review: &TokenReview) -> ReviewResult {
        let Some(status) = &review.status else {
            return ReviewResult {
                error: Some("TokenReview returned no status".to_owned()),
                ..ReviewResult::default()
            };
        };
        let user = status.user.as_ref();
        ReviewResult {
            authenticated: status.authenticated.unwrap_or(false),
            username: user.and_then(|u| u.username.clone()).unwrap_or_default(),
            groups: user.and_then(|u| u.groups.clone()).unwrap_or_default(),
            uid: user.and_then(|u| u.uid.clone()).filter(|u| !u.is_empty()),
            error: status.error.clone().filter(|e| !e.is_empty()),
        }
    }
}

/// How long a request waits for the API server to review its token.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewResult, TokenError>> {
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = Self::request(token, &self.audiences);
            let created = tokio::time::timeout(
                REVIEW_TIMEOUT,
                api.create(&kube::api::PostParams::default(), &review),
            )
            .await
            .map_err(|_| {
                TokenError::Unavailable(format!(
                    "TokenReview failed: no answer within {REVIEW_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| TokenError::Unavailable(format!("TokenReview failed: {e}")))?;
            Ok(Self::result(&created))
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    #[test]
    fn request_and_result_mapping() {
        let req = KubeTokenReviewer::request("tok", &["https://kubernetes.default.svc".to_owned()]);
        let json = serde_json::to_value(&req).expect("serialize");
        assert_eq!(json["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(json["kind"], "TokenReview");
        assert_eq!(json["spec"]["token"], "tok");
        assert_eq!(
            json["spec"]["audiences"][0],
            "https://kubernetes.default.svc"
        );
        assert!(
            KubeTokenReviewer::request("t", &[])
                .spec
                .audiences
                .is_none()
        );

        let mut review = req;
        assert!(!KubeTokenReviewer::result(&review).authenticated);
        review.status = Some(TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:ns:sa".to_owned()),
                groups: Some(vec!["system:serviceaccounts".to_owned()]),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        });
        let result = KubeTokenReviewer::result(&review);
        assert!(result.authenticated);
        assert_eq!(result.username, "system:serviceaccount:ns:sa");
        assert_eq!(result.groups, ["system:serviceaccounts"]);
    }
}
