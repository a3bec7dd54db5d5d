mod common;
use common::*;

#[tokio::test]
async fn export_through_the_gateway() {
    let gw = Gateway::start().await;
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    assert_eq!(r.json()["data"]["metadata"]["convo"]["id"], "c1");
    let seen = gw.eu.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v3/agents/agent-eu/convos/c1/export");
    assert_eq!(seen[0].query.as_deref(), Some("format=json"));
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}").as_str()
    );
}
