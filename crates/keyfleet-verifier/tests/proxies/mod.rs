//! The proxies' front doors (issue 16), on a real node: Envoy's ext_authz `Check` driven by
//! Envoy's own generated client (envoy-types), and HTTP forward-auth `/auth` driven by reqwest.
//! Allow, deny, no token, wrong audience, scope, step-up, a misconfigured route, a node that
//! cannot decide, and claims built to break headers.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as Attrs};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use keyfleet_verifier::ClaimHeader;

use super::*;

const HOUR: i64 = 60 * 60;

/// alice's token for audience `api`, scope "read write", logged in 100 s ago, with an email and
/// a list claim; `edit` changes it.
fn user_token(k: &Key, edit: impl FnOnce(&mut TokenClaims)) -> String {
    token_as(k, &k.kid, NOW, |c| {
        c.extra.insert("scope".into(), "read write".into());
        c.extra.insert("auth_time".into(), (NOW - 100).into());
        c.extra.insert("email".into(), "alice@example.com".into());
        c.extra
            .insert("groups".into(), serde_json::json!(["ops", "dev"]));
        edit(c)
    })
}

/// A token whose claims try to smuggle headers and control bytes into the answer.
fn hostile_token(k: &Key) -> String {
    user_token(k, |c| {
        c.sub = "alice\r\nx-admin: true".into();
        c.jti = "hostile".into();
        c.extra
            .insert("email".into(), "e@x\r\nset-cookie: a=b\u{0}".into());
        c.extra.insert("role".into(), "\n\r\t\u{7f}".into());
        c.extra
            .insert("groups".into(), serde_json::json!(["a\r\nb"]));
    })
}

fn mappings() -> Vec<ClaimHeader> {
    [
        "email=x-user-email",
        "groups=X-User-Groups",
        "role=x-user-role",
        "dept=x-user-dept",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

async fn proxy_node(source: Source, clock: Clock) -> Node {
    spawn_node(Config {
        audiences: vec!["api".into()],
        any_audience: false,
        clock,
        claim_headers: mappings(),
        ..Config::for_test(source)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Envoy ext_authz

fn check_request(headers: &[(&str, &str)], context: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Attrs {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..Attrs::default()
            }),
            context_extensions: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..AttributeContext::default()
        }),
    }
}

async fn check_call(node: &Node, request: CheckRequest) -> Result<CheckResponse, Status> {
    AuthorizationClient::new(node.channel.clone())
        .check(request)
        .await
        .map(Response::into_inner)
}

async fn check_ok(node: &Node, request: CheckRequest) -> CheckResponse {
    check_call(node, request).await.expect("Check answers")
}

/// The upstream headers an allowed answer sets, and the headers it removes.
fn allowed(answer: &CheckResponse) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(
        answer.status.as_ref().map(|s| s.code),
        Some(0),
        "{answer:?}"
    );
    let Some(HttpResponse::OkResponse(ok)) = &answer.http_response else {
        panic!("not an ok_response: {answer:?}");
    };
    let mut set = HashMap::new();
    for option in &ok.headers {
        // Each replaces whatever the client sent under that name.
        assert_eq!(
            option.append_action, 2,
            "OVERWRITE_IF_EXISTS_OR_ADD: {option:?}"
        );
        let h = option.header.as_ref().unwrap();
        assert!(
            set.insert(h.key.clone(), h.value.clone()).is_none(),
            "{ok:?}"
        );
    }
    (set, ok.headers_to_remove.clone())
}

/// (gRPC code, HTTP status, WWW-Authenticate, x-keyfleet-reason) of a denial.
type Denied = (i32, i32, String, String);

fn denied(answer: &CheckResponse) -> Denied {
    let Some(HttpResponse::DeniedResponse(d)) = &answer.http_response else {
        panic!("not a denied_response: {answer:?}");
    };
    let header = |name: &str| {
        d.headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
            .unwrap_or_default()
    };
    (
        answer.status.as_ref().unwrap().code,
        d.status.as_ref().unwrap().code,
        header("www-authenticate"),
        header("x-keyfleet-reason"),
    )
}

fn invalid_token(reason: &str) -> String {
    format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
}

fn clean(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_check_allows_denies_and_fails_like_envoy_expects() {
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let clock = Clock::manual(NOW);
    let node = proxy_node(authority.source(), clock.clone()).await;
    node.wait_ready().await;
    let good = user_token(&a, |_| {});
    let bearer = format!("Bearer {good}");

    // Allowed: who it is goes upstream, the raw token does not.
    let answer = check_ok(&node, check_request(&[("authorization", &bearer)], &[])).await;
    let (set, removed) = allowed(&answer);
    assert_eq!(set["x-keyfleet-subject"], "alice");
    assert_eq!(set["x-keyfleet-kid"], a.kid);
    assert_eq!(set["x-user-email"], "alice@example.com");
    assert_eq!(
        set["x-user-groups"], r#"["ops","dev"]"#,
        "non-strings as JSON"
    );
    assert_eq!(set["x-user-role"], "admin");
    assert!(!set.contains_key("x-user-dept"));
    assert_eq!(
        removed,
        ["authorization", "x-user-dept"],
        "the token, and a mapped header whose claim the token lacks (a client could have sent it)"
    );
    // The scheme in any case; the route's own policy met.
    let route = [
        ("audience", "api"),
        ("scopes", "write read"),
        ("max_auth_age", "100"),
    ];
    let lower = format!("bearer {good}");
    allowed(&check_ok(&node, check_request(&[("authorization", &lower)], &route)).await);
    // Envoy's `encode_raw_headers`: the header in `header_map` only.
    let mut raw = check_request(&[], &[]);
    let http = raw.attributes.as_mut().unwrap().request.as_mut().unwrap();
    http.http.as_mut().unwrap().header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "authorization".into(),
            raw_value: bearer.clone().into_bytes(),
            ..HeaderValue::default()
        }],
    });
    allowed(&check_ok(&node, raw).await);

    // Refused: 401 for the token, 403 for what the route demands beyond it.
    let expired = user_token(&a, |c| {
        c.iat = NOW - 2 * HOUR;
        c.nbf = NOW - 2 * HOUR;
        c.exp = NOW - HOUR;
    });
    let realm = "Bearer realm=\"keyfleet\"".to_owned();
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, String)>,
        Vec<(&'a str, &'a str)>,
        Denied,
    );
    let cases: Vec<Case> = vec![
        ("no header", vec![], vec![], (16, 401, realm.clone(), "NO_TOKEN".into())),
        (
            "another scheme",
            vec![("authorization", "Basic YWxpY2U6cHc=".into())],
            vec![],
            (16, 401, realm.clone(), "NO_TOKEN".into()),
        ),
        (
            "garbage",
            vec![("authorization", "Bearer not.a.token".into())],
            vec![],
            (16, 401, invalid_token("MALFORMED"), "MALFORMED".into()),
        ),
        (
            "expired",
            vec![("authorization", format!("Bearer {expired}"))],
            vec![],
            (16, 401, invalid_token("EXPIRED"), "EXPIRED".into()),
        ),
        (
            "wrong audience for the route",
            vec![("authorization", bearer.clone())],
            vec![("audience", "billing")],
            (16, 401, invalid_token("WRONG_AUDIENCE"), "WRONG_AUDIENCE".into()),
        ),
        (
            "scope",
            vec![("authorization", bearer.clone())],
            vec![("scopes", "read admin")],
            (
                7,
                403,
                "Bearer error=\"insufficient_scope\", error_description=\"INSUFFICIENT_SCOPE\", scope=\"read admin\"".into(),
                "INSUFFICIENT_SCOPE".into(),
            ),
        ),
        (
            "step-up",
            vec![("authorization", bearer.clone())],
            vec![("max_auth_age", "60")],
            (
                7,
                403,
                "Bearer error=\"insufficient_user_authentication\", error_description=\"LOGIN_TOO_OLD\", max_age=60".into(),
                "LOGIN_TOO_OLD".into(),
            ),
        ),
    ];
    for (what, headers, context, want) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = check_ok(&node, check_request(&headers, &context)).await;
        assert_eq!(denied(&answer), want, "{what}");
    }
    // The token's header is configurable and can be kept.
    let keeping = spawn_node(Config {
        clock: clock.clone(),
        authz_header: "x-token".into(),
        keep_authorization: true,
        ..Config::for_test(authority.source())
    })
    .await;
    keeping.wait_ready().await;
    let (_, removed) =
        allowed(&check_ok(&keeping, check_request(&[("x-token", &bearer)], &[])).await);
    assert!(removed.is_empty(), "{removed:?}");
    let ignored = check_ok(&keeping, check_request(&[("authorization", &bearer)], &[])).await;
    assert_eq!(denied(&ignored).3, "NO_TOKEN");

    // Claims built to break headers: allowed, and no value carries a control character.
    let answer = check_ok(
        &node,
        check_request(
            &[("authorization", &format!("Bearer {}", hostile_token(&a)))],
            &[],
        ),
    )
    .await;
    let (set, removed) = allowed(&answer);
    assert_eq!(set["x-keyfleet-subject"], "alicex-admin: true");
    assert_eq!(set["x-user-email"], "e@xset-cookie: a=b");
    assert_eq!(set["x-user-groups"], r#"["a\r\nb"]"#, "JSON escapes them");
    assert!(set.values().all(|v| clean(v)), "{set:?}");
    assert!(
        removed.contains(&"x-user-role".to_owned()),
        "nothing printable left: removed"
    );

    // A misconfigured route fails loudly, neither allowing nor denying.
    let err = check_call(
        &node,
        check_request(&[("authorization", &bearer)], &[("max_auth_age", "5m")]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_auth_age"), "{err:?}");

    // A node that cannot decide fails the call (Envoy's failure_mode_allow decides), never a
    // denial: before its first key set, and once its set is older than --max-stale.
    let blind = proxy_node(nowhere(), clock.clone()).await;
    let err = check_call(&blind, check_request(&[("authorization", &bearer)], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    authority.stop().await;
    // A renewal already in flight when the source stopped may still land and date the set
    // after a clock step, so step until the set has aged past --max-stale with no source left.
    eventually("the node fails the call once its set is stale", || async {
        clock.advance(2 * HOUR);
        check_call(&node, check_request(&[("authorization", &bearer)], &[]))
            .await
            .is_err_and(|e| e.code() == tonic::Code::Unavailable)
    })
    .await;
    let err = check_call(&node, check_request(&[("authorization", &bearer)], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // A request without a token is still answered: no key set is needed to say "log in".
    let answer = check_ok(&node, check_request(&[], &[])).await;
    assert_eq!(denied(&answer).1, 401);
    blind.stop().await;
    keeping.stop().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP forward-auth

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().expect("a header of visible text"))
    }
}

async fn auth(
    node: &Node,
    method: reqwest::Method,
    query: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let url = format!("http://{}/auth{query}", node.served.http);
    let mut request = reqwest::Client::new().request(method, url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("/auth answers");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_answers_200_401_403_and_503() {
    use reqwest::Method;
    let a = key(1);
    let authority = FakeAuthority::start(snapshot(1, &[&a])).await;
    let clock = Clock::manual(NOW);
    let node = proxy_node(authority.source(), clock.clone()).await;
    node.wait_ready().await;
    let bearer = format!("Bearer {}", user_token(&a, |_| {}));
    let with_token = [("authorization", bearer.as_str())];

    let ok = auth(&node, Method::GET, "", &with_token).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-auth-request-user"), "alice");
    assert_eq!(ok.header("remote-user"), "alice");
    assert_eq!(ok.header("x-auth-request-email"), "alice@example.com");
    assert_eq!(ok.header("x-user-groups"), r#"["ops","dev"]"#);
    assert_eq!(ok.header("x-user-role"), "admin");
    assert_eq!(ok.header("x-user-dept"), "");
    // Any method (Traefik and Caddy forward the client's).
    for method in [Method::POST, Method::HEAD, Method::DELETE] {
        assert_eq!(
            auth(&node, method.clone(), "", &with_token).await.status,
            200,
            "{method}"
        );
    }
    // The route's policy from the query, or from headers; the query wins.
    let policy = "?audience=api&scopes=read%20write&max_auth_age=100";
    assert_eq!(
        auth(&node, Method::GET, policy, &with_token).await.status,
        200
    );
    let scope = auth(&node, Method::GET, "?scopes=read+admin", &with_token).await;
    assert_eq!(scope.status, 403);
    assert_eq!(
        scope.header("www-authenticate"),
        "Bearer error=\"insufficient_scope\", error_description=\"INSUFFICIENT_SCOPE\", scope=\"read admin\""
    );
    assert_eq!(scope.header("x-keyfleet-reason"), "INSUFFICIENT_SCOPE");
    assert_eq!(
        scope.header("x-auth-request-user"),
        "",
        "nothing about the user on a refusal"
    );
    let step_up = [
        ("authorization", bearer.as_str()),
        ("x-keyfleet-max-auth-age", "60"),
    ];
    let old = auth(&node, Method::GET, "", &step_up).await;
    assert_eq!(old.status, 403);
    assert_eq!(
        old.header("www-authenticate"),
        "Bearer error=\"insufficient_user_authentication\", error_description=\"LOGIN_TOO_OLD\", max_age=60"
    );
    assert_eq!(
        auth(&node, Method::GET, "?max_auth_age=3600", &step_up)
            .await
            .status,
        200
    );
    let scoped = [
        ("authorization", bearer.as_str()),
        ("x-keyfleet-scopes", "admin"),
    ];
    assert_eq!(auth(&node, Method::GET, "", &scoped).await.status, 403);
    let billing = [
        ("authorization", bearer.as_str()),
        ("x-keyfleet-audience", "billing"),
    ];
    let wrong = auth(&node, Method::GET, "", &billing).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(
        wrong.header("www-authenticate"),
        invalid_token("WRONG_AUDIENCE")
    );
    assert_eq!(
        auth(&node, Method::GET, "?audience=billing", &with_token)
            .await
            .status,
        401
    );

    let none = auth(&node, Method::GET, "", &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), "Bearer realm=\"keyfleet\"");
    let expired = user_token(&a, |c| {
        c.iat = NOW - 2 * HOUR;
        c.nbf = NOW - 2 * HOUR;
        c.exp = NOW - HOUR;
    });
    let expired = auth(
        &node,
        Method::GET,
        "",
        &[("authorization", &format!("Bearer {expired}"))],
    )
    .await;
    assert_eq!(expired.status, 401);
    assert_eq!(expired.header("www-authenticate"), invalid_token("EXPIRED"));
    assert_eq!(expired.header("x-keyfleet-reason"), "EXPIRED");

    // Claims built to break headers: one clean header each, nothing smuggled.
    let hostile = format!("Bearer {}", hostile_token(&a));
    let answer = auth(&node, Method::GET, "", &[("authorization", &hostile)]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-auth-request-user"), "alicex-admin: true");
    assert_eq!(answer.header("x-auth-request-email"), "e@xset-cookie: a=b");
    assert!(answer.headers.get("x-admin").is_none() && answer.headers.get("set-cookie").is_none());
    assert_eq!(answer.header("x-user-role"), "");
    for (name, value) in &answer.headers {
        assert!(clean(value.to_str().unwrap()), "{name}: {value:?}");
    }

    // A misconfigured route is a loud 400; a node that cannot decide answers 503.
    assert_eq!(
        auth(&node, Method::GET, "?max_auth_age=soon", &with_token)
            .await
            .status,
        400
    );
    let blind = proxy_node(nowhere(), clock.clone()).await;
    assert_eq!(auth(&blind, Method::GET, "", &with_token).await.status, 503);
    authority.stop().await;
    clock.advance(2 * HOUR);
    assert_eq!(auth(&node, Method::GET, "", &with_token).await.status, 503);
    blind.stop().await;
    node.stop().await;
}

#[test]
fn claim_header_flags_are_checked() {
    let parsed: ClaimHeader = "email=X-User-Email".parse().unwrap();
    assert_eq!(
        (parsed.claim.as_str(), parsed.header.as_str()),
        ("email", "x-user-email")
    );
    for bad in [
        "email",
        "=x-a",
        "email=",
        "email=x a",
        "email=x\r\ny",
        "sub=host",
        "sub=x-keyfleet-subject",
        "sub=x-auth-request-user",
        "sub=Transfer-Encoding",
    ] {
        let err = bad.parse::<ClaimHeader>().unwrap_err().to_string();
        assert!(err.contains("--claim-header"), "{bad}: {err}");
    }
    let base = || Config::for_test(nowhere());
    let twice = Config {
        claim_headers: vec!["a=x-a".parse().unwrap(), "b=x-a".parse().unwrap()],
        ..base()
    };
    assert!(twice.check().is_err());
    let token_header = Config {
        claim_headers: vec!["a=authorization".parse().unwrap()],
        ..base()
    };
    assert!(token_header.check().is_err());
    for bad in ["", "Authorization", "a b", "host"] {
        let config = Config {
            authz_header: bad.into(),
            ..base()
        };
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("--authz-header"), "{bad:?}: {err}");
    }
}
