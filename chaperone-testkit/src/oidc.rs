//! An in-process OIDC issuer for tests: discovery and JWKS over TLS on 127.0.0.1, and
//! real RS256/ES256 signing keys.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use rustls_pki_types::{PrivatePkcs1KeyDer, pem::PemObject as _};

use gateway_userspace::identity::oidc::OidcIssuerConfig;

/// Fixed RSA test keys (PKCS#1), generated once with `openssl genpkey`; generating RSA keys
/// in a debug build takes seconds.
const RSA_KEYS: [&str; 2] = [
    "
-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAwrngxvamqeOtC+tkL4Y6dlmlLEIEY/hktisrWhv6XpxwDUQ2
AnvhPMqK0BiYUpvXoplNGjyMsAL6oJGj0X+YZxYj/kxUYp/iII5kjhy15t42Psh6
KFbu2kjZzEnqzqWx37n53wMr+zN/H3IFcyJmo+CGRLnT+iXkUhixCzdz1QDMl9Qp
gQFnxRSyQgLX6SiejeFWHS0xJh5VVyKBXh0CCPmUc/1DboyCCcYLP9yhI6uNMkqn
sGJndG42qLITvPw6XQnge3iDWnP3bnJcjV+QCMA1HpOUUuhjsqaoIOxCUymGOU2b
n9BRwVnFePFJoJ9uIWHE0b0lKkynEoaD14B8GQIDAQABAoIBAAD7vmWIiyFIAgd2
M8B/1O2JJm5/UmxIZJjz6luYdaWMBsWNPJkEZjWv6ypUFOWz5tigsBCHP2UQ31tc
KO1zYeavFh5gHBdqIKT3X7HXUVkizaVl4P/DpzJbXXg15BDsvIEwRWzgbWcKQCS0
ZyttpMvWkZy7T16Px39dWnxkH1XOo8q7amlMHpJQQzLCz5RZjYRCn9Bq8ADcDWQE
UH5NMe04OKTmPEl7yM1SMSCuVkR8uRPLiDlptQp9SY8r+XTEC9iCG2L1z6+8MmNy
z7XyDQokwQF0S7Jn+A9EbufM1DgYDzq3+lX/QNjdmg8yyknpU4VfAdMFCmUjPlNk
0nkN16ECgYEA48hRN3P65W2xa1gHcxy3v0bIv6VyQWEJAxpOTj0bDOLza9m9/Vcu
0ylkxsYYs483Pga9nxDMit4zciZf3FNUuzWKkTEuI0HmakRO4Yfd4cIhY3ruJpMp
MOGtxJsYMYGsEcJvxXdY4CxJ6qW3csRF+r3E9kEX0aum3yCv87r/+wkCgYEA2tk9
m0gzqrKtqWf/7+diJBH5kA3JlWZltaI/PQMG61o7MXzBBZxvZAq7zmwXOrTdnujH
nHWJvgwgmMhoN6s75PACAGykGR6G/dg97rymkk6gI9P6STX9xIxbg586SmSZIjQF
DKBKJhoWdbv/zzDZEygyfkQsj40uf1K2+vMf7JECgYAyfZG7KANCXelI8Q9drczx
IkCXcpX79gVoYalf4F2hoqDwlChwAqZHelJzWS/ahXFqV1Yq7y9XzN88e1MeZH5Q
rRKVEoC2ogHwJkoR5esCAuUhxvsJI++qfSvme7aGKsc4fJAIBmd18XtE/wzF7MnS
RcRmDZG5EUKBDR7TeO0K+QKBgC62skzEA6tLCoCfn2TxCeTTJWcXWlEWk11K7Z6z
V7XDA+GTVIxDEQ/UrrPoJKk2VBwIahs+h5FWe1rBZGWFmnpKtNKsXfayqnPixY2B
HTkbqVkcdU9NRAbBQwN8aG/au0kuu2kvicRKS0MERx1Nuvg421ZSbQSTSTqKSF6W
qNjRAoGADAyfWS+hV9CPJRqmqnHAIgbWwFWZV5Lwmqlxz/XHekKbCTDP6PPavKKS
BX5DuLtt88JlQI5Kf7UYTF7AOWtj9WUuDOLPWsa4aAMmveMfzajElD8zQNS2KAso
eygwmN81J9ZfJwlacauAatpaa09AnyGm0zbYbHDYkasrAFsNX14=
-----END RSA PRIVATE KEY-----
",
    "
-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEA9NU6iTy2YvKcFedl7X84lidDai/wWgdSJps4rEDjFnwS2IZs
CPFBvtwM6oJbdgnNvMursxhA5y2OBhHIVDugwO9VxxtXEyO1EX8l3Yzer+0Xv7RE
8IUe+EbkPx/yYUFmH8nYCrdkDpH6tOQmx8o5ufZhkp6hyVUlVljfin1cjdS2p9C3
Ia9kWlTx5lYaky8SC3MyZGGDpt64oHMWwHn6NbPLLMJpjQepxvJ2WFOzxclb/Yzb
zUM90/Vmf4kzVfCqGoCQfLn9WXF6vdlhaReUZka23K9JvGFuTMmfnG7XNSrdlPqP
cAeBF5RnTSOFQ/YuR4dhKby4C9F9ni+YkkxHcwIDAQABAoIBAFXBVgZ5wHx589fs
PBRqyjw1tnQ8JFi0Vb72AWy8MY5PmR5EPxUGw/uBAfkl/bkjh++H+zT42sredu+D
TQLL++t4KThbSC2JBUQCoBWw4NMIHZhlIPyJ9CYMVqgRnYkZKhcaUNS4FZDQ6tpv
S3IRUBTlyplbfNmTPEe5S1sru75lQs9yFyZ0ShZ1hza2sbVuP3lHYRDlWgzqAGiC
xXWfz3Cqu1t6YpWpc7RgrWGPmp9/q6m4T9d3PWLNLz/bWQ/yfOaQir2761qkXrkV
Es2Xi7joEzc1DEw8YU15wJtUG3d9cvHYamvSupag3kAG8/nTMNstvjzT+drI17z+
XCkwAKECgYEA+vlbHQZtsrqYgNzjsqxk9hVtADfKYyRMXfKs5lCwP0YjpcWBasUZ
bO5Zmn2Z2J0Az6Gdbx6Ww8HXYkGUAZVvoMX/nxkfB7GQShf92gXAt/KVgiYm52/b
jptsRvIRIVl2c2ddxKfn/NTxeFdbThryC720PwzdxlJJC9+2GEhVrfECgYEA+bxj
wHEc6Fyuj4ZDkqWPeMOj1EqbiGER2rZNu+nbiiaH1mBJXrCZhWS1s4OX9lvHhT1Y
S0im6dxKRKVVIH8DCjubXs/aVj071NwauAP+qmVDca3jBhx4sm1sqytBf1m55ZXy
7d0y/rr5sCyPSH5I0GXc+d57l6O2HjzfiAib96MCgYAYiCM11RkH7WFWx0CiiGNe
An4jFVD9G+EzFbN818pChRKa85FQ5G81zJ6JkVlmaQJZSUzgPbcy71GkUxCqjvbY
WkJARO5ZjCu0cl/n3cQWtumSTTRkTvTBHcQZszOldN81LJdnz5nHhvELeE5+dffO
2f4yY4mSBx0IwhdEjF2DoQKBgE+N2MT8A3Zt19m2rp3viaWxxOWioqsuKO7gNiEP
XTVEEu+SmqzEWxNoQo2d9PGwyP1DznWk/i7vUuVNObHxY/mFhXgNhIMGXKHxP72w
4BZNzc9P0ksnFLfaLczVKbc00Qg23T0ywsTssQ+TEk3IlM92M4+RdROYPjKht59x
BqY7AoGAKkShdFBOQAYVeY9bJGJvnwa9DZjIhUgteASZirAn8P1aNkcl5Nw7NT0k
03v1xI2FIAHMnYKiYEyCVvKAhUF6F61lgX9+GNynpSMfMB69aZ3AC95H9XY5kFAz
w+tBs62jVsg3553G7aZzz/xhmW/eeB84pWzEFd09cgWMoCLDmTU=
-----END RSA PRIVATE KEY-----
",
];

/// A key the test issuer signs with, and publishes in its JWKS.
pub struct TestKey {
    /// The `kid` in the JWKS and in token headers.
    pub kid: String,
    /// RS256 or ES256.
    pub alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl TestKey {
    /// One of the two fixed RSA keys (`which` 0 or 1), for RS256.
    pub fn rs256(kid: &str, which: usize) -> Self {
        let der = PrivatePkcs1KeyDer::from_pem_slice(RSA_KEYS[which % RSA_KEYS.len()].as_bytes())
            .unwrap_or_else(|e| panic!("test RSA key: {e}"));
        Self::new(
            kid,
            Algorithm::RS256,
            EncodingKey::from_rsa_der(der.secret_pkcs1_der()),
        )
    }

    /// A fresh P-256 key, for ES256.
    pub fn es256(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap_or_else(|e| panic!("generate P-256 key: {e}"));
        Self::new(
            kid,
            Algorithm::ES256,
            EncodingKey::from_ec_der(&pair.serialize_der()),
        )
    }

    fn new(kid: &str, alg: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap_or_else(|e| panic!("JWK: {e}"));
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid: kid.to_owned(),
            alg,
            key,
            jwk,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// Signs `claims` with this key (header: alg and kid).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap_or_else(|e| panic!("sign: {e}"))
    }
}

#[derive(Default)]
struct State {
    issuer: String,
    jwks: serde_json::Value,
    jwks_requests: usize,
}

/// An OIDC issuer serving discovery and JWKS over TLS on 127.0.0.1; stops when dropped.
pub struct TestIssuer {
    /// The issuer URL (`https://127.0.0.1:<port>`).
    pub url: String,
    ca_file: tempfile::NamedTempFile,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestIssuer {
    /// Starts an issuer publishing `keys`.
    pub async fn start(keys: &[&TestKey]) -> Self {
        let (ca, _) = gateway_userspace::tls::CertificateAuthority::generate("test-oidc-ca")
            .unwrap_or_else(|e| panic!("CA: {e}"));
        let (chain, key) = ca
            .issue_server_cert(
                &["localhost".to_owned()],
                &["127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))],
                std::time::Duration::from_secs(3600),
            )
            .unwrap_or_else(|e| panic!("server cert: {e}"));
        let mut tls = (*gateway_userspace::tls::server_config(chain, key)
            .unwrap_or_else(|e| panic!("{e}")))
        .clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr: SocketAddr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("https://127.0.0.1:{}", addr.port());
        let state = Arc::new(Mutex::new(State {
            issuer: url.clone(),
            ..State::default()
        }));
        let ca_file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("tempfile: {e}"));
        std::fs::write(ca_file.path(), ca.cert_pem()).unwrap_or_else(|e| panic!("write CA: {e}"));

        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let state = served.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(&state, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let issuer = Self {
            url,
            ca_file,
            state,
            task,
        };
        issuer.publish(keys);
        issuer
    }

    /// Replaces the published keys (key rotation).
    pub fn publish(&self, keys: &[&TestKey]) {
        let jwks = serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() });
        self.lock().jwks = jwks;
    }

    /// Publishes a raw JWKS document.
    pub fn publish_raw(&self, jwks: serde_json::Value) {
        self.lock().jwks = jwks;
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_requests(&self) -> usize {
        self.lock().jwks_requests
    }

    /// A verifier config for this issuer, trusting its CA.
    pub fn config(&self, client_id: &str) -> OidcIssuerConfig {
        OidcIssuerConfig {
            issuer_url: self.url.clone(),
            client_id: client_id.to_owned(),
            username_claim: "sub".to_owned(),
            username_prefix: None,
            groups_claim: Some("groups".to_owned()),
            groups_prefix: None,
            ca_file: Some(self.ca_file.path().to_owned()),
        }
    }

    /// Standard claims: this issuer, `aud`, `sub`, issued now, valid for five minutes.
    pub fn claims(&self, sub: &str, aud: &str) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp();
        serde_json::json!({
            "iss": self.url,
            "aud": aud,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn serve(state: &Mutex<State>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let body = match req.uri().path() {
        "/.well-known/openid-configuration" => serde_json::json!({
            "issuer": state.issuer,
            "jwks_uri": format!("{}/keys", state.issuer),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }),
        "/keys" => {
            state.jwks_requests += 1;
            state.jwks.clone()
        }
        _ => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not found")));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            return response;
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
