//! The mock's exports: a conversation in JSON shaped like the API documentation's example
//! response, the same as CSV, and its `Last-Modified`. Each carries its revision, so a refetch
//! shows; generated turns make a body of a chosen size.

use std::time::{Duration, SystemTime};

/// When revision 1 was last modified (`Sun, 01 Dec 2024 10:30:02 GMT`); each later revision
/// a minute after the one before.
pub fn last_modified(version: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(1_733_049_002)
        + Duration::from_secs(60 * version.saturating_sub(1))
}

/// Revision `version` of a conversation in JSON, with `turns` generated turns after the two
/// of the documentation's example.
pub fn json(region: &str, agent: &str, convo: &str, version: u64, turns: usize) -> String {
    let mut all = vec![
        serde_json::json!({ "from": "user", "messages": [{ "type": "text", "ts": "December 1st 2024, 10:30:00 am",
            "payload": { "message": "Hello!", "feedback": "Unset", "aiGenerated": false } }] }),
        serde_json::json!({ "from": "bot", "messages": [{ "type": "text", "ts": "December 1st 2024, 10:30:02 am",
            "payload": { "message": "Hi! How can I help you today?", "feedback": "Positive", "aiGenerated": true } }] }),
    ];
    all.extend((0..turns).map(|i| {
        let (from, ai) = if i.is_multiple_of(2) { ("user", false) } else { ("bot", true) };
        serde_json::json!({ "from": from, "messages": [{ "type": "text",
            "ts": format!("December 1st 2024, {}:{:02}:{:02} am", 10 + i / 3600 % 2, i / 60 % 60, i % 60),
            "payload": { "message": message(i), "feedback": "Unset", "aiGenerated": ai } }] })
    }));
    serde_json::json!({
        "success": true,
        "message": "Conversation exported successfully",
        "data": {
            "metadata": {
                "feedback": "Positive",
                "convo": {
                    "id": convo,
                    "agentId": agent,
                    "userName": "John Doe",
                    "userEmail": "john@example.com",
                    "userPhone": "+1234567890",
                    "userCompany": "Acme Corp",
                    "notes": format!("Served by the {region} mock, revision {version}"),
                    "tags": ["new-lead"],
                    "origin": "web"
                },
                "sessions": []
            },
            "turns": all
        }
    })
    .to_string()
}

/// The same conversation as CSV.
pub fn csv(agent: &str, convo: &str, version: u64, turns: usize) -> String {
    let mut out = format!(
        "agentId,convoId,revision,from,type,ts,message,feedback,aiGenerated\n\
         {agent},{convo},{version},user,text,\"December 1st 2024, 10:30:00 am\",Hello!,Unset,false\n\
         {agent},{convo},{version},bot,text,\"December 1st 2024, 10:30:02 am\",Hi! How can I help you today?,Positive,true\n"
    );
    for i in 0..turns {
        let (from, ai) = if i.is_multiple_of(2) {
            ("user", false)
        } else {
            ("bot", true)
        };
        out.push_str(&format!(
            "{agent},{convo},{version},{from},text,\"December 1st 2024, 10:{:02}:{:02} am\",\"{}\",Unset,{ai}\n",
            i / 60 % 60,
            i % 60,
            message(i)
        ));
    }
    out
}

/// A turn's text: varied as a real conversation's, so compression ratios are not flattered by
/// one repeated line.
fn message(i: usize) -> String {
    const WORDS: [&str; 24] = [
        "order", "delivery", "refund", "invoice", "account", "password", "shipping", "tracking",
        "number", "please", "thanks", "today", "tomorrow", "address", "changed", "wrong", "size",
        "colour", "return", "label", "support", "agent", "billing", "plan",
    ];
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n = 8 + (x % 17) as usize;
    let mut words = Vec::with_capacity(n + 1);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        words.push(WORDS[(x % 24) as usize]);
    }
    words.push(if i.is_multiple_of(2) { "?" } else { "." });
    format!("#{i} {}", words.join(" "))
}

/// Revision `version` in JSON, as the documentation's example (no generated turns).
pub fn sample_json(region: &str, agent: &str, convo: &str, version: u64) -> String {
    json(region, agent, convo, version, 0)
}

/// Revision `version` in CSV (no generated turns).
pub fn sample_csv(agent: &str, convo: &str, version: u64) -> String {
    csv(agent, convo, version, 0)
}
