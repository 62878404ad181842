//! Huge inputs: a 5 MiB body gets a readable 413, and errors quote at most a short piece of an input.

use super::*;

#[tokio::test]
async fn a_5_mib_body_gets_a_readable_413_after_the_client_sends_it_all() {
    let run = begin("a_5_mib_body_gets_a_readable_413").await;
    let db = TestDb::new().await;
    let server = Server::start(&db.url, &[]).await;
    let token = token_for("alice", None);
    let body = json!({
        "query": "query($blob: String) { __typename }",
        "variables": { "blob": "x".repeat(5 * 1024 * 1024) },
    })
    .to_string()
    .into_bytes();

    let mut results = Vec::new();
    for chunked in [false, true] {
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_owned()
        } else {
            format!("Content-Length: {}", body.len())
        };
        let head = format!(
            "POST /graphql HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\n{framing}\r\n\r\n",
            server.addr
        );
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let started = Instant::now();
        let mut sent = 0;
        let write = async {
            stream.write_all(head.as_bytes()).await?;
            for piece in body.chunks(64 * 1024) {
                if chunked {
                    stream
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                    stream.write_all(piece).await?;
                    stream.write_all(b"\r\n").await?;
                } else {
                    stream.write_all(piece).await?;
                }
                sent += piece.len();
            }
            if chunked {
                stream.write_all(b"0\r\n\r\n").await?;
            }
            stream.flush().await
        };
        let wrote = match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("{err} after {sent} of {} body bytes", body.len())),
            Err(_) => Err(format!("stuck after {sent} of {} body bytes", body.len())),
        };
        let response = read_response(&mut stream, Duration::from_secs(10)).await;
        let framing = if chunked { "chunked" } else { "Content-Length" };
        eprintln!(
            "5 MiB by {framing}: sending {wrote:?} in {}; response {:?}",
            seconds(started.elapsed()),
            response
                .as_ref()
                .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())),
        );
        results.push((framing, wrote, response));
    }

    for (framing, wrote, response) in results {
        assert_eq!(
            wrote,
            Ok(()),
            "{framing}: the client could not send its body"
        );
        let response = response.unwrap_or_else(|e| panic!("{framing}: no response: {e}"));
        assert_eq!(response.status, 413, "{framing}: {response:?}");
        assert_eq!(
            response.error_code().as_deref(),
            Some("PAYLOAD_TOO_LARGE"),
            "{framing}: {response:?}"
        );
    }
    drop(run);
}

#[tokio::test]
async fn errors_quote_at_most_a_short_piece_of_a_huge_input() {
    let run = begin("errors_quote_at_most_a_short_piece_of_a_huge_input").await;
    let db = TestDb::new().await;
    let server = Server::start(&db.url, &[]).await;
    let token = token_for("alice", None);
    let huge = "x".repeat(100 * 1024);
    let upper = "X".repeat(100 * 1024);
    let cases: Vec<(&str, String, Value, Option<String>)> = vec![
        (
            "inline task id",
            format!("{{ task(id: \"{huge}\") {{ id }} }}"),
            json!({}),
            None,
        ),
        (
            "task id variable",
            "query($id: ID!) { task(id: $id) { id } }".into(),
            json!({ "id": huge }),
            None,
        ),
        (
            "createTask type",
            format!("mutation {{ createTask(input: {{type: \"{huge}\"}}) {{ id }} }}"),
            json!({}),
            None,
        ),
        (
            "taskByResultId",
            format!("{{ taskByResultId(resultId: \"{huge}\") {{ id }} }}"),
            json!({}),
            None,
        ),
        ("unknown field", format!("{{ {huge} }}"), json!({}), None),
        (
            "unknown enum value",
            format!("{{ tasks(status: [{upper}]) {{ nodes {{ id }} }} }}"),
            json!({}),
            None,
        ),
        (
            "syntax error",
            format!("{{ task(id: \"{huge}\") {{ id }}"),
            json!({}),
            None,
        ),
        (
            "wrongly typed variable",
            "query($n: Int) { tasks(first: $n) { nodes { id } } }".into(),
            json!({ "n": huge }),
            None,
        ),
        (
            "unknown operation name",
            "query A { tasks { nodes { id } } }".into(),
            json!({}),
            Some(huge.clone()),
        ),
    ];
    let http = common::edge::http_client(Duration::from_secs(10));
    let mut failures = Vec::new();
    for (what, query, variables, operation) in cases {
        let mut request = json!({ "query": query, "variables": variables });
        if let Some(operation) = operation {
            request["operationName"] = json!(operation);
        }
        let response = http
            .post(format!("{}/graphql", server.base))
            .bearer_auth(&token)
            .json(&request)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let messages: Vec<&str> = body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["message"].as_str())
            .collect();
        let longest = messages.iter().map(|m| m.chars().count()).max();
        // The input is one repeated letter: its longest run is what was quoted.
        let quoted = messages
            .iter()
            .flat_map(|m| m.split(|c| c != 'x' && c != 'X'))
            .map(str::len)
            .max();
        let codes = error_codes(&body);
        eprintln!(
            "{what}: HTTP {status}, codes {codes:?}, quotes {quoted:?} characters of the input, \
             longest message {longest:?} chars, body {} bytes",
            text.len()
        );
        // About 100 characters of input; for a bad id the whole message is
        // short (the row the operators asked for).
        let message_limit = if what.contains("task id") {
            200
        } else {
            usize::MAX
        };
        let short = quoted.is_some_and(|n| n <= 110)
            && longest.is_some_and(|n| n <= message_limit)
            && text.len() <= 4096;
        if !short || codes.is_empty() || codes.iter().any(|c| c != "BAD_USER_INPUT") {
            failures.push(format!(
                "{what}: {codes:?}, quotes {quoted:?} characters, longest message {longest:?} \
                 chars, body {} bytes: {}",
                text.len(),
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(run);
}
