import Crypto
import Foundation

/// What a `PUT /v1/webhooks/{id}` asks for, once decoded and validated (the URL's host against the allowed list
/// is checked by `WebhookURL`).
public struct WebhookRequest: Sendable, Equatable {
    public static let urlBytesMax = 2_048

    public var url: String
    /// Empty: every type.
    public var types: [String]
    public var enabled: Bool

    public init(url: String, types: [String], enabled: Bool) {
        self.url = url
        self.types = types
        self.enabled = enabled
    }

    /// Shape, then `url`, then `types`, then `enabled`; a field of the wrong JSON type gets that field's code.
    public static func decode(body: [UInt8], hostsAllowed: WebhookHostsAllowed) -> Result<WebhookRequest, Problem> {
        let value: JSONValue
        switch TransferRequest.parseJSON(body) {
        case .success(let parsed): value = parsed
        case .failure(let problem): return .failure(problem)
        }
        if let problem = TransferRequest.objectProblem(value, allowed: ["url", "types", "enabled"]) {
            return .failure(problem)
        }
        guard case .string(let url)? = value["url"] else {
            return .failure(.invalidWebhookURL("url is required: an absolute http or https URL."))
        }
        if let problem = WebhookURL.problem(url, hostsAllowed: hostsAllowed) { return .failure(problem) }
        var types: [String] = []
        switch value["types"] {
        case nil: break
        case .array(let elements)?:
            for element in elements {
                guard case .string(let type) = element, EventType.all.contains(type) else {
                    return .failure(
                        .invalidEventType("types must be event types: \(EventType.all.joined(separator: ", ")).")
                    )
                }
                if !types.contains(type) { types.append(type) }
            }
        default:
            return .failure(.invalidEventType("types must be an array of event types."))
        }
        var enabled = true
        switch value["enabled"] {
        case nil: break
        case .bool(let flag)?: enabled = flag
        default: return .failure(.invalidJSON("enabled must be true or false."))
        }
        return .success(WebhookRequest(url: url, types: types, enabled: enabled))
    }
}

/// A webhook URL: absolute http or https, at most 2,048 bytes, a host the allowed list admits and no link-local IP.
public enum WebhookURL {
    /// The host of an absolute http(s) URL (brackets of an IPv6 literal removed, lower-cased), else nil.
    public static func host(_ url: String) -> String? {
        let lower = url.lowercased()
        let rest: Substring
        if lower.hasPrefix("http://") {
            rest = lower.dropFirst(7)
        } else if lower.hasPrefix("https://") {
            rest = lower.dropFirst(8)
        } else {
            return nil
        }
        guard lower.utf8.allSatisfy({ $0 > 0x20 && $0 != 0x7F }) else { return nil }
        var authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        var host: Substring
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { return nil }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            guard after.isEmpty || (after.hasPrefix(":") && after.dropFirst().allSatisfy(\.isNumber)) else { return nil }
        } else {
            let parts = authority.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            host = parts[0]
            if parts.count == 2 { guard parts[1].allSatisfy(\.isNumber) else { return nil } }
        }
        if host.hasSuffix(".") { host = host.dropLast() }
        return host.isEmpty ? nil : String(host)
    }

    /// Why `url` is refused, or nil when it is acceptable.
    public static func problem(_ url: String, hostsAllowed: WebhookHostsAllowed) -> Problem? {
        guard url.utf8.count <= WebhookRequest.urlBytesMax else {
            return .invalidWebhookURL("url must be at most \(WebhookRequest.urlBytesMax) bytes.")
        }
        guard let host = host(url) else { return .invalidWebhookURL("url must be an absolute http or https URL with a host.") }
        if let address = IPAddress(host), address.isLinkLocal {
            return .invalidWebhookURL("url must not target a link-local address.")
        }
        guard hostsAllowed.admits(host: host) else {
            return .invalidWebhookURL("The host of url is not among the hosts this service may call.")
        }
        return nil
    }
}

/// An IPv4 or IPv6 address, as bytes.
public struct IPAddress: Sendable, Equatable {
    public var bytes: [UInt8]

    public init?(_ text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// 169.254.0.0/16 and fe80::/10, and the IPv4 range seen through an IPv4-mapped IPv6 address.
    public var isLinkLocal: Bool {
        if bytes.count == 4 { return bytes[0] == 169 && bytes[1] == 254 }
        if bytes[0] == 0xFE && bytes[1] & 0xC0 == 0x80 { return true }
        let mapped = bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xFF && bytes[11] == 0xFF
        return mapped && bytes[12] == 169 && bytes[13] == 254
    }

    /// Whether the first `prefixBits` bits equal those of `network` (of the same family).
    func matches(_ network: IPAddress, prefixBits: Int) -> Bool {
        guard network.bytes.count == bytes.count else { return false }
        for bit in 0..<prefixBits {
            let mask = UInt8(0x80) >> UInt8(bit % 8)
            if bytes[bit / 8] & mask != network.bytes[bit / 8] & mask { return false }
        }
        return true
    }
}

/// `--webhook-hosts-allowed`: comma-separated host names, IP addresses or CIDR ranges, or `*` for any.
public struct WebhookHostsAllowed: Sendable, Equatable {
    public var any: Bool
    public var names: Set<String>
    public var ranges: [(network: IPAddress, prefixBits: Int)]

    public static func == (lhs: Self, rhs: Self) -> Bool {
        lhs.any == rhs.any && lhs.names == rhs.names && lhs.ranges.map(\.network) == rhs.ranges.map(\.network)
            && lhs.ranges.map(\.prefixBits) == rhs.ranges.map(\.prefixBits)
    }

    public static let everyHost = WebhookHostsAllowed(any: true, names: [], ranges: [])

    init(any: Bool, names: Set<String>, ranges: [(network: IPAddress, prefixBits: Int)]) {
        self.any = any
        self.names = names
        self.ranges = ranges
    }

    /// Parses the list; nil when an entry is neither `*`, a host name, an IP address nor a CIDR range.
    public init?(parsing list: String) {
        var any = false
        var names: Set<String> = []
        var ranges: [(network: IPAddress, prefixBits: Int)] = []
        for raw in list.split(separator: ",") {
            let entry = raw.trimmingOWS.lowercased()
            if entry == "*" {
                any = true
            } else if let slash = entry.firstIndex(of: "/") {
                guard let network = IPAddress(String(entry[..<slash])), let bits = Int(entry[entry.index(after: slash)...]),
                    (0...(network.bytes.count * 8)).contains(bits)
                else { return nil }
                ranges.append((network, bits))
            } else if let address = IPAddress(entry) {
                ranges.append((address, address.bytes.count * 8))
            } else {
                guard !entry.isEmpty, entry.utf8.allSatisfy({ $0 > 0x20 && $0 != UInt8(ascii: "/") }) else { return nil }
                names.insert(entry.hasSuffix(".") ? String(entry.dropLast()) : entry)
            }
        }
        self.init(any: any, names: names, ranges: ranges)
    }

    /// Whether a URL may target `host` (a name, or an IP literal without brackets).
    public func admits(host: String) -> Bool {
        if any { return true }
        let lower = host.lowercased()
        if let address = IPAddress(lower) {
            return ranges.contains { address.matches($0.network, prefixBits: $0.prefixBits) }
        }
        return names.contains(lower)
    }
}

/// Standard Webhooks 1.0 signatures, and the secrets they are keyed with.
public enum WebhookSignature {
    /// The secret of one webhook: `whsec_` + base64 of HMAC-SHA256 under the service's key over the client, the
    /// webhook id and a per-webhook nonce kept in the database. The secret itself is stored nowhere.
    public static func secret(serviceKey: [UInt8], client: String, webhookID: String, nonce: [UInt8]) -> String {
        var message = Array("ledger webhook secret\u{0}".utf8)
        message += Array(client.utf8) + [0] + Array(webhookID.utf8) + [0] + nonce
        let mac = HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: serviceKey))
        return "whsec_" + Data(mac).base64EncodedString()
    }

    /// `v1,<base64 of HMAC-SHA256 over "{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of the
    /// secret after `whsec_`; nil for a malformed secret.
    public static func header(secret: String, messageID: String, timestamp: Int64, body: [UInt8]) -> String? {
        guard secret.hasPrefix("whsec_"), let key = Data(base64Encoded: String(secret.dropFirst(6))) else { return nil }
        let message = Array("\(messageID).\(timestamp).".utf8) + body
        let mac = HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: key))
        return "v1," + Data(mac).base64EncodedString()
    }

    /// Which service key made a secret, as stored with the webhook: `database` for the key in the database, else
    /// the first 8 bytes of SHA-256 of the configured key, in hex (never the key itself).
    public static func keyID(configuredKey: [UInt8]?) -> String {
        guard let configuredKey else { return "database" }
        return "sha256:" + Hex.encode(Array(SHA256.hash(data: configuredKey).prefix(8)))
    }
}

/// When a failed delivery is tried again.
public enum WebhookRetry {
    /// The longest wait a receiver's Retry-After can ask for: a day. Beyond it a hostile or broken receiver could
    /// park its deliveries for ever (or past what an interval holds).
    public static let retryAfterMaxMs = 86_400_000

    /// Exponential backoff with jitter: attempt n (1-based) failed, the next waits between half and all of
    /// min(max, base * 2^(n-1)) milliseconds (`random` in 0..<1), and never less than `retryAfterMs` (a 429 or
    /// 503's Retry-After, parsed by `RetryAfter.delayMs`), even beyond max, up to `retryAfterMaxMs`.
    public static func delayMilliseconds(
        afterAttempt attempt: Int, baseMs: Int, maxMs: Int, retryAfterMs: Int?, random: Double
    ) -> Int {
        precondition(attempt >= 1 && baseMs >= 1 && maxMs >= baseMs, "backoff bounds")
        let exponent = min(attempt - 1, 40)
        let ceiling = Double(min(Double(maxMs), Double(baseMs) * pow(2, Double(exponent))))
        let delay = Int(ceiling / 2 + ceiling / 2 * min(max(random, 0), 1))
        return max(delay, min(retryAfterMs ?? 0, retryAfterMaxMs))
    }
}
