import AsyncHTTPClient
import Foundation
import LedgerCore
import LedgerStore
import Logging
import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix

/// One attempt of one delivery: sign, POST, classify the answer.
struct WebhookAttempter: Sendable {
    let http: HTTPClient
    let store: LedgerStore
    let options: WebhookDeliveryOptions
    let logger: Logger

    /// Answer bodies are read and dropped, at most this much: a receiver has nothing to tell us in them.
    static let answerBytesMax = 64 << 10

    func attempt(_ delivery: LedgerStore.WebhookDelivery) async -> LedgerStore.DeliveryResult {
        let (status, retryAfterMs, error) = await send(delivery)
        let outcome: LedgerStore.DeliveryOutcome
        if let status, (200..<300).contains(status) {
            outcome = .delivered
            let lag = Date().timeIntervalSince(delivery.eventCreatedAt)
            Timer(label: "ledger_webhook_delivery_lag_seconds").recordNanoseconds(Int64(max(0, lag) * 1e9))
        } else if status == 410 {
            outcome = .gone
        } else {
            outcome = delivery.attempt >= options.attemptsMax ? .failed : .retry
        }
        Counter(label: "ledger_webhook_deliveries_total", dimensions: [("outcome", outcome.rawValue)]).increment()
        if outcome != .delivered {
            logger.info(
                "webhook attempt failed",
                metadata: [
                    "client.id": "\(delivery.client)", "webhook.id": "\(delivery.webhookID)",
                    "event.id": "\(delivery.eventID)", "webhook.attempt": "\(delivery.attempt)",
                    "http.status": "\(status.map(String.init) ?? "none")", "webhook.outcome": "\(outcome.rawValue)",
                ])
        }
        let retryIn =
            outcome == .retry
            ? WebhookRetry.delayMilliseconds(
                afterAttempt: delivery.attempt, baseMs: options.retryBaseMilliseconds, maxMs: options.retryMaxMilliseconds,
                retryAfterMs: retryAfterMs, random: Double.random(in: 0..<1)) : nil
        return LedgerStore.DeliveryResult(
            client: delivery.client, webhookID: delivery.webhookID, eventSeq: delivery.eventSeq, outcome: outcome,
            retryInMilliseconds: retryIn, status: status, error: error)
    }

    /// The answer's status and its Retry-After (429 and 503 only), or an error and no status.
    private func send(_ delivery: LedgerStore.WebhookDelivery) async -> (Int?, Int?, String?) {
        guard let host = WebhookURL.host(delivery.url) else { return (nil, nil, "malformed url") }
        if await resolvesToLinkLocal(host) { return (nil, nil, "host resolves to a link-local address") }
        let key: (id: String, bytes: [UInt8])
        do {
            key = try await store.webhookServiceKey()
        } catch {
            return (nil, nil, "webhook key unavailable")
        }
        guard key.id == delivery.secretKeyID else {
            logger.error(
                "webhook secret made under another service key; set the same LEDGER_WEBHOOK_KEY on every replica",
                metadata: ["client.id": "\(delivery.client)", "webhook.id": "\(delivery.webhookID)"])
            return (nil, nil, "secret made under another service key")
        }
        let secret = WebhookSignature.secret(
            serviceKey: key.bytes, client: delivery.client, webhookID: delivery.webhookID, nonce: delivery.secretNonce)
        let body = Array(delivery.body.utf8)
        let timestamp = Int64(Date().timeIntervalSince1970)
        var request = HTTPClientRequest(url: delivery.url)
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.headers.add(name: "user-agent", value: "ledger-webhooks/1")
        request.headers.add(name: "webhook-id", value: String(delivery.eventID))
        request.headers.add(name: "webhook-timestamp", value: String(timestamp))
        request.headers.add(
            name: "webhook-signature",
            value: WebhookSignature.header(secret: secret, messageID: String(delivery.eventID), timestamp: timestamp, body: body)!)
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let response = try await http.execute(request, timeout: .milliseconds(Int64(options.timeoutMilliseconds)))
            let status = Int(response.status.code)
            var retryAfter: Int?
            if status == 429 || status == 503, let value = response.headers.first(name: "retry-after") {
                retryAfter = RetryAfter.delayMs(value)
            }
            _ = try? await response.body.collect(upTo: Self.answerBytesMax)
            return (status, retryAfter, status < 300 ? nil : "answered \(status)")
        } catch {
            return (nil, nil, "\(type(of: error))")
        }
    }

    /// Whether a host name resolves to a link-local address (refused whatever the allowed list says). Resolved on
    /// NIO's thread pool: getaddrinfo blocks.
    private func resolvesToLinkLocal(_ host: String) async -> Bool {
        if let literal = IPAddress(host) { return literal.isLinkLocal }
        let addresses = (try? await NIOThreadPool.singleton.runIfActive { Self.resolve(host) }) ?? []
        return addresses.contains { $0.isLinkLocal }
    }

    private static func resolve(_ host: String) -> [IPAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &list) == 0, let first = list else { return [] }
        defer { freeaddrinfo(first) }
        var addresses: [IPAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let entry = cursor, addresses.count < 64 {
            if let address = entry.pointee.ai_addr {
                if entry.pointee.ai_family == AF_INET {
                    var v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
                    addresses.append(IPAddress(bytes: withUnsafeBytes(of: &v4) { Array($0) }))
                } else if entry.pointee.ai_family == AF_INET6 {
                    var v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                    addresses.append(IPAddress(bytes: withUnsafeBytes(of: &v6) { Array($0) }))
                }
            }
            cursor = entry.pointee.ai_next
        }
        return addresses
    }
}
