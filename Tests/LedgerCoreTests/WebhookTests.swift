import Foundation
import LedgerCore
import Testing

@Suite("Webhooks: requests, URLs, signatures, retries")
struct WebhookTests {
    func code(_ body: String, hosts: WebhookHostsAllowed = .everyHost) -> String? {
        if case .failure(let problem) = WebhookRequest.decode(body: Array(body.utf8), hostsAllowed: hosts) {
            return problem.code
        }
        return nil
    }

    @Test("a request decodes with its defaults; each field's wrong type has its own code")
    func decoding() throws {
        let request = try WebhookRequest.decode(
            body: Array(#"{"url":"https://example.com/x"}"#.utf8), hostsAllowed: .everyHost
        ).get()
        #expect(request == WebhookRequest(url: "https://example.com/x", types: [], enabled: true))
        #expect(code(#"{}"#) == "invalid-webhook-url")
        #expect(code(#"{"url":1}"#) == "invalid-webhook-url")
        #expect(code(#"{"url":"https://a.example","types":"x"}"#) == "invalid-event-type")
        #expect(code(#"{"url":"https://a.example","types":["transfer.deleted"]}"#) == "invalid-event-type")
        #expect(code(#"{"url":"https://a.example","enabled":"yes"}"#) == "invalid-json")
        #expect(code(#"{"url":"https://a.example","other":1}"#) == "invalid-json")
        #expect(code(#"[]"#) == "invalid-json")
    }

    @Test("URLs: absolute http(s) with a host, at most 2048 bytes, never link-local")
    func urls() {
        #expect(WebhookURL.host("https://Example.COM:8443/a?b#c") == "example.com")
        #expect(WebhookURL.host("http://user:pw@[::1]:80/x") == "::1")
        #expect(WebhookURL.host("HTTP://T") == "t")
        for bad in ["ftp://x", "http://", "https:///x", "http://a:b/", "http://a b/", "/x", "http://[::1"] {
            #expect(WebhookURL.host(bad) == nil, "\(bad)")
        }
        #expect(code(#"{"url":"http://169.254.169.254/"}"#) == "invalid-webhook-url")
        #expect(code(#"{"url":"http://[fe80::1]/"}"#) == "invalid-webhook-url")
        #expect(code(#"{"url":"http://[::ffff:169.254.1.1]/"}"#) == "invalid-webhook-url")
        #expect(code(#"{"url":"https://example.com/\#(String(repeating: "a", count: 2048))"}"#) == "invalid-webhook-url")
    }

    @Test("the allowed hosts: names, addresses, CIDR ranges, or any")
    func hostsAllowed() throws {
        let hosts = try #require(WebhookHostsAllowed(parsing: "hooks.example.com, 10.0.0.0/8, ::1"))
        #expect(hosts.admits(host: "HOOKS.example.com"))
        #expect(hosts.admits(host: "10.20.30.40"))
        #expect(hosts.admits(host: "::1"))
        #expect(!hosts.admits(host: "11.0.0.1"))
        #expect(!hosts.admits(host: "other.example.com"))
        #expect(WebhookHostsAllowed(parsing: "*")?.admits(host: "anything") == true)
        #expect(WebhookHostsAllowed(parsing: "10.0.0.0/33") == nil)
        #expect(WebhookHostsAllowed(parsing: "a/b") == nil)
        #expect(code(#"{"url":"https://other.example.com/"}"#, hosts: hosts) == "invalid-webhook-url")
    }

    @Test("signatures as Standard Webhooks 1.0 computes them")
    func signatures() throws {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        let body = Array(#"{"test": 2432232314}"#.utf8)
        let header = try #require(
            WebhookSignature.header(secret: secret, messageID: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1614265330, body: body))
        #expect(header == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        #expect(WebhookSignature.header(secret: "nope", messageID: "1", timestamp: 1, body: []) == nil)
        let derived = WebhookSignature.secret(
            serviceKey: Array(repeating: 7, count: 32), client: "c", webhookID: "h", nonce: Array(repeating: 1, count: 32))
        #expect(derived.hasPrefix("whsec_") && Data(base64Encoded: String(derived.dropFirst(6)))?.count == 32)
        #expect(derived != WebhookSignature.secret(
            serviceKey: Array(repeating: 7, count: 32), client: "c", webhookID: "h2", nonce: Array(repeating: 1, count: 32)))
    }

    @Test("backoff doubles from the base, jittered, capped; Retry-After wins even beyond the cap")
    func backoff() {
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 1, baseMs: 100, maxMs: 1000, retryAfterMs: nil, random: 0) == 50)
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 1, baseMs: 100, maxMs: 1000, retryAfterMs: nil, random: 1) == 100)
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 3, baseMs: 100, maxMs: 1000, retryAfterMs: nil, random: 1) == 400)
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 60, baseMs: 100, maxMs: 1000, retryAfterMs: nil, random: 1) == 1000)
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 2, baseMs: 100, maxMs: 1000, retryAfterMs: 5000, random: 0) == 5000)
        // A receiver asking for more than a day gets a day: its delivery is neither parked for ever nor past what
        // the database's interval holds.
        let huge = RetryAfter.delayMs("99999999999999999999")
        #expect(WebhookRetry.delayMilliseconds(afterAttempt: 2, baseMs: 100, maxMs: 1000, retryAfterMs: huge, random: 0) == 86_400_000)
        let now = Date(timeIntervalSince1970: 1_000_000_000)
        #expect(RetryAfter.delayMs("7", now: now) == 7000)
        #expect(RetryAfter.delayMs("Sun, 09 Sep 2001 01:46:50 GMT", now: now) == 10_000)
        #expect(RetryAfter.delayMs("Sat, 01 Jan 2000 00:00:00 GMT", now: now) == 0)
        #expect(RetryAfter.delayMs("soon", now: now) == nil)
    }

    @Test("GET /v1/events queries: limit, wait_s, then the form of after")
    func eventsQuery() throws {
        #expect(try EventsQuery.parse(after: nil, limit: nil, waitSeconds: nil).get() == EventsQuery(after: nil, limit: 100, waitSeconds: 0))
        #expect(try EventsQuery.parse(after: "42", limit: "1000", waitSeconds: "30").get() == EventsQuery(after: 42, limit: 1000, waitSeconds: 30))
        for (after, limit, wait, code) in [
            (nil, "0", nil, "invalid-limit"), (nil, "1001", nil, "invalid-limit"), (nil, nil, "31", "invalid-wait"),
            ("0", nil, nil, "invalid-cursor"), ("01", nil, nil, "invalid-cursor"), ("x", nil, nil, "invalid-cursor"),
        ] as [(String?, String?, String?, String)] {
            guard case .failure(let problem) = EventsQuery.parse(after: after, limit: limit, waitSeconds: wait) else {
                Issue.record("accepted \(String(describing: after)) \(String(describing: limit)) \(String(describing: wait))")
                continue
            }
            #expect(problem.code == code)
        }
    }
}
