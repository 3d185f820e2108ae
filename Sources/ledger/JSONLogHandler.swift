import Foundation
import LedgerCore
import Logging
import Synchronization

/// One JSON object per line on standard error: `{"ts":...,"level":...,"label":...,"message":...,<metadata>}`, with
/// swift-log's dotted metadata keys as they are (`request.id`, `db.sqlstate`). For log shippers that parse JSON.
struct JSONLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    private static let output = Mutex<Void>(())

    init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        var line = "{\"ts\":\(JSONValue.quoted(Date.now.formatted(.iso8601)))"
        line += ",\"level\":\(JSONValue.quoted(event.level.rawValue))"
        line += ",\"label\":\(JSONValue.quoted(label))"
        line += ",\"message\":\(JSONValue.quoted(event.message.description))"
        for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
            line += ",\(JSONValue.quoted(key)):\(JSONValue.quoted(value.description))"
        }
        line += "}\n"
        // One write per line, serialised, so lines from concurrent requests never interleave.
        Self.output.withLock { _ in FileHandle.standardError.write(Data(line.utf8)) }
    }
}
