//! A TokenReview backend with fixed answers, counting its calls.

use futures_util::future::BoxFuture;
use gateway_userspace::identity::{
    TokenError,
    tokenreview::{ReviewResult, TokenReviewer},
};

/// A reviewer with a fixed answer per token, counting calls (tests).
#[derive(Debug, Default)]
pub struct FakeTokenReviewer {
    answers: std::sync::Mutex<std::collections::HashMap<String, Result<ReviewResult, String>>>,
    calls: std::sync::atomic::AtomicUsize,
}

impl FakeTokenReviewer {
    /// A reviewer that knows no token (every review says unauthenticated).
    pub fn new() -> Self {
        Self::default()
    }

    /// `token` authenticates as `username` with `groups`.
    pub fn authenticate(&self, token: &str, username: &str, groups: &[&str]) {
        self.answer(token, username, None, groups);
    }

    /// `token` authenticates as `username` with `uid` and `groups`.
    pub fn authenticate_with_uid(&self, token: &str, username: &str, uid: &str, groups: &[&str]) {
        self.answer(token, username, Some(uid), groups);
    }

    fn answer(&self, token: &str, username: &str, uid: Option<&str>, groups: &[&str]) {
        self.set(
            token,
            Ok(ReviewResult {
                authenticated: true,
                username: username.to_owned(),
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                uid: uid.map(str::to_owned),
                error: None,
            }),
        );
    }

    /// Reviews of `token` fail as if the API server were unreachable.
    pub fn fail(&self, token: &str, message: &str) {
        self.set(token, Err(message.to_owned()));
    }

    /// How many reviews were made.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self, token: &str, answer: Result<ReviewResult, String>) {
        self.answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.to_owned(), answer);
    }
}

impl TokenReviewer for FakeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewResult, TokenError>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answer = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .cloned();
        Box::pin(async move {
            match answer {
                Some(Ok(result)) => Ok(result),
                Some(Err(message)) => Err(TokenError::Unavailable(message)),
                None => Ok(ReviewResult {
                    authenticated: false,
                    error: Some("invalid bearer token".to_owned()),
                    ..ReviewResult::default()
                }),
            }
        })
    }
}
